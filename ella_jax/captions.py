"""Caption upsampling: rewrite a short prompt into the dense description ELLA was trained on.

ELLA's connector was trained on long synthetic captions (up to 128 T5 tokens) that spell out
objects, attributes, counts and layout. Short user prompts are far from that distribution; as
the ELLA README suggests, having an LLM expand them into 3-5 descriptive sentences first helps.

Nothing here calls a model: `upsample_caption` takes any user-supplied `generate` function that
maps chat messages to the LLM's reply (a local model, an API client, ...).
"""

from collections.abc import Callable

INSTRUCTION = (
    "You expand short prompts for a text-to-image model into detailed image descriptions. "
    "Given a short prompt, write one paragraph of 3 to 5 sentences that describes the image it "
    "asks for: every object and its attributes (colour, material, size, texture), how many "
    "there are of each, where they are relative to one another, the background and setting, "
    "the lighting, and the visual style or medium. Keep every fact of the prompt, including "
    "counts, colours, text and positions, and add no detail that contradicts it; only add "
    "plausible details that the prompt leaves open. Answer with the description alone, without "
    "a preamble, quotes, lists or comments."
)

EXAMPLES: list[tuple[str, str]] = [
    (
        "a red bicycle leaning on a fence",
        "A bright red bicycle with a black leather saddle and silver handlebars leans against a "
        "weathered white picket fence. The bicycle stands slightly angled, its front wheel "
        "turned toward the viewer and a small wicker basket fixed above the front mudguard. "
        "Behind the fence, a green lawn stretches toward a row of leafy trees under a pale "
        "blue morning sky. Soft sunlight casts the thin shadows of the spokes onto the grass, "
        "in the style of a crisp, natural-colour photograph.",
    ),
    (
        "three cats on a sofa, watercolor",
        "A watercolor painting of three cats resting together on a plump mustard-yellow sofa. "
        "On the left, a grey tabby sits upright; in the middle, a ginger cat lies curled into "
        "a ball; on the right, a black cat with white paws stretches along the armrest. Two "
        "patterned cushions in teal and coral lean against the sofa's back. The background is "
        "a loosely painted living-room wall in soft cream washes, with visible paper texture "
        "and gentle bleeding of the colours at the edges.",
    ),
    (
        "a lighthouse at night",
        "A tall white lighthouse with a red-painted top stands on a rocky outcrop at night, "
        "its lamp casting a broad beam of warm yellow light across the dark sea. Waves break "
        "in white foam against the black rocks at its base. Above, a deep navy sky is scattered "
        "with stars and a thin crescent moon hangs to the right of the tower. The scene is "
        "rendered as a moody, high-contrast photograph with cool blue tones.",
    ),
    (
        'a coffee cup with the word "MONDAY" on it next to a laptop',
        'A white ceramic coffee cup printed with the word "MONDAY" in bold black capital '
        "letters sits on a light oak desk, steam curling up from the dark coffee inside. To the "
        "right of the cup, an open silver laptop shows a blurred spreadsheet on its screen. A "
        "closed spiral notebook and a blue pen lie in front of the laptop. Morning light from a "
        "window on the left falls across the desk, giving the clean, realistic photograph a "
        "calm, bright mood.",
    ),
]


def build_messages(prompt: str) -> list[dict[str, str]]:
    """Chat messages for an LLM: the instruction as the system turn, the examples as
    user/assistant turns, then `prompt` as the last user turn."""
    messages = [{"role": "system", "content": INSTRUCTION}]
    for short, dense in EXAMPLES:
        messages.append({"role": "user", "content": short})
        messages.append({"role": "assistant", "content": dense})
    messages.append({"role": "user", "content": prompt})
    return messages


def upsample_caption(prompt: str, generate: Callable[[list[dict[str, str]]], str]) -> str:
    """`prompt` rewritten by `generate` (a user-supplied LLM call taking chat messages and
    returning the reply text), stripped of surrounding whitespace; the original prompt when the
    reply is empty."""
    reply = generate(build_messages(prompt))
    reply = reply.strip() if isinstance(reply, str) else ""
    return reply or prompt

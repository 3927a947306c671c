"""A Hugging Face transformers VQA model as DPG-Bench's VQA (the `eval` extra: torch).

    python -m ella_jax.dpg_bench score ... --vqa /models/blip-vqa-base

A folder that `AutoModelForVisualQuestionAnswering` loads (BLIP, BLIP-2, ViLT) with its
processor. Generative models (BLIP, BLIP-2) answer with `generate`, ViLT with its best label.
torch is a scorer dependency here, never the library's.
"""

from PIL import Image


class TransformersVQA:
    """answers = TransformersVQA(folder)(images, questions): one answer per (crop, question),
    computed in one batch, on the GPU when torch sees one."""

    def __init__(self, folder: str, device: str | None = None, max_new_tokens: int = 10) -> None:
        try:
            import torch
            from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor
        except ImportError as e:
            raise ImportError(
                f"{e}: a transformers VQA model needs torch (pip install 'ella-jax[eval]')"
            ) from None
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForVisualQuestionAnswering.from_pretrained(folder)
        self.model = model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        inputs = self.processor(
            images=images, text=questions, return_tensors="pt", padding=True
        ).to(self.device)
        with self.torch.inference_mode():
            if not hasattr(self.model, "generate") or "Vilt" in type(self.model).__name__:
                labels = self.model(**inputs).logits.argmax(-1).tolist()
                return [self.model.config.id2label[i] for i in labels]
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        prompt = inputs["input_ids"]
        echoed = tokens.shape[1] > prompt.shape[1] and self.torch.equal(
            tokens[:, : prompt.shape[1]], prompt
        )
        if echoed and not self.model.config.is_encoder_decoder:
            tokens = tokens[:, prompt.shape[1] :]  # decoder-only: drop the echoed question
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

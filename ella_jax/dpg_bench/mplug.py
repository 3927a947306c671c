"""modelscope's mPLUG-large, the VQA model of DPG-Bench's published numbers.

    pip install modelscope  # with its own torch; see README, "DPG-Bench"
    python -m ella_jax.dpg_bench score ... --vqa ella_jax.dpg_bench.mplug:answer

The model (`DPG_MPLUG_MODEL`, default the official damo/mplug_visual-question-answering_coco_
large_en) runs on `DPG_MPLUG_DEVICE` (default "gpu"), one (crop, question) at a time as the
official script asks it.
"""

import functools
import os

from PIL import Image

OFFICIAL_MODEL = "damo/mplug_visual-question-answering_coco_large_en"


@functools.cache
def _pipeline():
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    model = os.environ.get("DPG_MPLUG_MODEL", OFFICIAL_MODEL)
    device = os.environ.get("DPG_MPLUG_DEVICE", "gpu")
    return pipeline(Tasks.visual_question_answering, model=model, device=device)


def answer(images: list[Image.Image], questions: list[str]) -> list[str]:
    """mPLUG's answer text per (crop, question)."""
    vqa = _pipeline()
    pairs = zip(images, questions, strict=True)
    return [vqa({"image": image, "question": q})["text"] for image, q in pairs]

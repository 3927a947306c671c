"""The official DPG-Bench scorer (TencentQQGYLab/ELLA, dpg_bench/compute_dpg_bench.py at 3c228f1)
re-implemented statement by statement for one process, bugs included, as the reference of
`ella_jax.dpg_bench`'s official mode: pandas reads the CSV, `iterrows` skips index 0, the
questions are walked with the same dicts, the same in-place zeroing and the same exception
handling; only the accelerate gathering (one process: the identity) and the result files are
left out. `vqa_model.vqa(image, question)` is the model's interface there."""

import os
import os.path as osp
from collections import defaultdict

import numpy as np
import pandas as pd
from PIL import Image


def prepare_dpg_data(csv_path):
    previous_id = ""
    question_dict = {}
    data = pd.read_csv(csv_path)
    for i, line in data.iterrows():
        if i == 0:
            continue
        current_id = line.item_id
        qid = int(line.proposition_id)
        dependency_list_int = [int(d.strip()) for d in line.dependency.split(",")]
        if current_id == previous_id:
            question_dict[current_id]["qid2tuple"][qid] = line.tuple
            question_dict[current_id]["qid2dependency"][qid] = dependency_list_int
            question_dict[current_id]["qid2question"][qid] = line.question_natural_language
        else:
            question_dict[current_id] = {
                "qid2tuple": {qid: line.tuple},
                "qid2dependency": {qid: dependency_list_int},
                "qid2question": {qid: line.question_natural_language},
            }
        previous_id = current_id
    return question_dict


def compute_dpg_one_sample(question_dict, image_path, vqa_model, resolution, pic_num):
    generated_image = Image.open(image_path)
    r = resolution
    crop_tuples = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
    crop_tuples = crop_tuples[:pic_num]
    key = osp.basename(image_path).split(".")[0]
    value = question_dict.get(key, None)
    qid2tuple = value["qid2tuple"]
    qid2question = value["qid2question"]
    qid2dependency = value["qid2dependency"]

    qid2scores = {}
    scores = []
    for crop_tuple in crop_tuples:
        cropped_image = generated_image.crop(crop_tuple)
        for qid, question in qid2question.items():
            answer = vqa_model.vqa(cropped_image, question)
            qid2scores[qid] = float(answer == "yes")
        qid2scores_orig = qid2scores.copy()

        for qid, parent_ids in qid2dependency.items():
            any_parent_answered_no = False
            for parent_id in parent_ids:
                if parent_id == 0:
                    continue
                if qid2scores[parent_id] == 0:
                    any_parent_answered_no = True
                    break
            if any_parent_answered_no:
                qid2scores[qid] = 0

        scores.append(sum(qid2scores.values()) / len(qid2scores))
    average_score = sum(scores) / len(scores)
    return average_score, qid2tuple, qid2scores_orig


def official_scores(csv_path, image_root_path, resolution, pic_num, vqa_model):
    """(DPG score, {L1: score}, {L2: score}, {file name: score 0-1}) as the official script
    prints them, and the failed file names."""
    question_dict = prepare_dpg_data(csv_path)
    local_scores, per_image, failed = [], {}, []
    local_category2scores = defaultdict(list)
    for fn in os.listdir(image_root_path):
        image_path = osp.join(image_root_path, fn)
        try:
            score, qid2tuple, qid2scores = compute_dpg_one_sample(
                question_dict, image_path, vqa_model, resolution, pic_num
            )
            local_scores.append(score)
            per_image[fn] = score
            for qid in qid2tuple:
                category = qid2tuple[qid].split("(")[0].strip()
                local_category2scores[category].append(qid2scores[qid])
        except Exception:
            failed.append(fn)
            continue
    mean_dpg_score = np.mean(local_scores)
    global_categories = set(local_category2scores)
    global_category2scores_l1 = defaultdict(list)
    for category in global_categories:
        global_category2scores_l1[category.split("-")[0].strip()].extend(
            local_category2scores[category]
        )
    l1 = {c: np.mean(v) * 100 for c, v in global_category2scores_l1.items()}
    l2 = {c: np.mean(local_category2scores[c]) * 100 for c in sorted(global_categories)}
    return mean_dpg_score * 100, l1, l2, per_image, sorted(failed)

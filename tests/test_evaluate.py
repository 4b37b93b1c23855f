"""Evaluation: the metrics on hand-built matrices, and a saved tiny model against transformers' own pipeline."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipConfig, SiglipModel

from siglip.data import Sample, Source
from siglip.errors import UserError
from siglip.evaluate import (
    class_embeddings,
    embed_images,
    evaluate,
    multi_caption_recall,
    retrieval_recall,
    zeroshot_accuracy,
)


def unit_rows(n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)


# --------------------------------------------------------------------------------------------- pure metrics


def test_zeroshot_accuracy_perfect_and_shuffled():
    k, n = 5, 40
    classes = unit_rows(k, 16)
    labels = torch.randint(0, k, (n,))
    images = F.normalize(classes[labels] + 0.01 * torch.randn(n, 16, dtype=torch.float64), dim=1)
    assert zeroshot_accuracy(images, classes, labels) == 1.0
    # Relabel with a derangement of the classes: no image keeps its class.
    shifted = (labels + 1) % k
    assert zeroshot_accuracy(images, classes, shifted) == 0.0
    # Half the images moved onto the wrong class: accuracy is exactly the untouched half.
    wrong = labels.clone()
    wrong[::2] = (labels[::2] + 2) % k
    assert zeroshot_accuracy(images, classes, wrong) == pytest.approx(0.5)


def test_zeroshot_accuracy_on_a_matrix_built_by_hand():
    classes = torch.eye(3)                             # class c is the c-th axis
    images = F.normalize(torch.tensor([[0.9, 0.1, 0.0],   # closest to class 0
                                       [0.2, 0.3, 0.9],   # class 2
                                       [0.5, 0.6, 0.0],   # class 1
                                       [0.1, 0.8, 0.7]]), dim=1)   # class 1
    assert zeroshot_accuracy(images, classes, torch.tensor([0, 2, 1, 2])) == pytest.approx(0.75)


def test_retrieval_recall_perfect_and_shuffled():
    n = 12
    images = unit_rows(n, 64)
    perfect = retrieval_recall(images, images.clone())
    assert perfect == {f"{d}_r{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    # Texts shuffled: image i's nearest text is the one equal to it, which matches only where perm fixes i.
    perm = torch.randperm(n)
    shuffled = retrieval_recall(images, images[perm], ks=(1, n))
    fixed = float((perm == torch.arange(n)).double().mean())
    assert shuffled["image_to_text_r1"] == pytest.approx(fixed)
    assert shuffled["text_to_image_r1"] == pytest.approx(fixed)
    assert shuffled["image_to_text_r12"] == 1.0 and shuffled["text_to_image_r12"] == 1.0


def test_retrieval_recall_on_a_matrix_built_by_hand():
    # With the images the axes, similarity[i, j] = texts[j, i]: image i's scores are column i of `texts`.
    texts = torch.tensor([[0.9, 0.1, 0.4],
                          [0.8, 0.2, 0.1],
                          [0.1, 0.95, 0.3]])
    images = torch.eye(3)
    recall = retrieval_recall(images, texts, ks=(1, 2))   # features need not be unit for the ranking itself
    # image 0: texts score [0.9, 0.8, 0.1] -> its own text first.           rank 0
    # image 1: texts score [0.1, 0.2, 0.95] -> own text (0.2) second.      rank 1
    # image 2: texts score [0.4, 0.1, 0.3] -> own text (0.3) second.       rank 1
    assert recall["image_to_text_r1"] == pytest.approx(1 / 3) and recall["image_to_text_r2"] == 1.0
    # text 0: images score [0.9, 0.1, 0.4] -> rank 0; text 1: [0.8, 0.2, 0.1] -> rank 1; text 2: [0.1, 0.95, 0.3]
    # -> rank 1.
    assert recall["text_to_image_r1"] == pytest.approx(1 / 3) and recall["text_to_image_r2"] == 1.0
    # Pairs 1 and 2 share a caption: texts 1 and 2 both match images 1 and 2. Image 1's best match is now text 2
    # (0.95, rank 0); image 2's best match scores 0.3, still below text 0 (0.4). Text 2 finds image 1 first
    # (0.95); text 1's best match (0.2) stays below image 0 (0.8).
    grouped = retrieval_recall(images, texts, ks=(1,), groups=torch.tensor([0, 1, 1]))
    assert grouped["image_to_text_r1"] == pytest.approx(2 / 3) and grouped["text_to_image_r1"] == pytest.approx(2 / 3)


def brute_force_recall(images, texts, caption_image, groups, ks):
    """The definition, literally: the full (n, m) float64 matrix, and each query's best right answer's rank."""
    scores = images.double() @ texts.double().T                                   # (n, m)
    n, m = scores.shape
    right = torch.zeros(n, m, dtype=torch.bool)                                   # text j answers image i
    for j in range(m):
        for k in range(m):
            if groups[k] == groups[j]:
                right[caption_image[k], j] = True
    results = {}
    for direction, matrix, answers in (("image_to_text", scores, right), ("text_to_image", scores.T, right.T)):
        best = matrix.masked_fill(~answers, float("-inf")).amax(dim=1, keepdim=True)
        rank = ((matrix >= best) & ~answers).sum(dim=1)              # wrong answers scoring at least as high
        results.update({f"{direction}_r{k}": float((rank < k).double().mean()) for k in ks})
    return results


def random_retrieval_set(integer: bool):
    """Images with 1 to 5 captions each, a fifth of the captions repeating another's text (and embedding).
    integer: features of small integers, whose scores are exact in float32 and tie often (the tie rule matters)."""
    n = int(torch.randint(5, 30, ()))
    counts = torch.randint(1, 6, (n,))
    caption_image = torch.repeat_interleave(torch.arange(n), counts)[torch.randperm(int(counts.sum()))]
    m = len(caption_image)
    groups = torch.arange(m)
    repeated = torch.rand(m) < 0.2
    groups[repeated] = torch.randint(0, m, (int(repeated.sum()),))
    groups[repeated] = groups[groups[repeated]]              # a repeat of a repeat names the same text
    d = 8
    if integer:
        images = torch.randint(-2, 3, (n, d)).float()
        texts = images[caption_image] + torch.randint(-2, 3, (m, d)).float()
    else:
        images = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
        texts = F.normalize(images[caption_image] + 0.8 * torch.randn(m, d, dtype=torch.float64), dim=1)
    texts[repeated] = texts[groups[repeated]]                # identical captions embed identically
    return images, texts, caption_image, groups


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
def test_multi_caption_recall_equals_the_brute_force(chunk, integer):
    images, texts, caption_image, groups = random_retrieval_set(integer)
    ks = (1, 2, 5, 10)
    got = multi_caption_recall(images, texts, caption_image, ks, caption_groups=groups, chunk=chunk)
    want = brute_force_recall(images, texts, caption_image, groups, ks)
    # The same hits exactly: the scores are exact (small integers) or float64 on both sides, ties count against.
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["image_to_text_r10"] <= 1


def test_multi_caption_recall_counts_an_image_found_by_any_caption():
    images = torch.eye(3)
    # image 0 has captions 0 and 1, image 1 caption 2, image 2 caption 3; scores = texts[:, image].
    texts = torch.tensor([[0.1, 0.9, 0.0],     # caption 0 of image 0: closest to image 1
                          [0.8, 0.0, 0.0],     # caption 1 of image 0
                          [0.0, 0.2, 0.3],     # caption 2 of image 1: closest to image 2
                          [0.0, 0.0, 0.7]])    # caption 3 of image 2
    caption_image = torch.tensor([0, 0, 1, 2])
    recall = multi_caption_recall(images, texts, caption_image, ks=(1, 2))
    # image 0: best text is caption 1 (0.8), its own: hit at 1. image 1: caption 0 (0.9) above its caption 2
    # (0.2): hit at 2. image 2: caption 3 (0.7) first.
    assert recall["image_to_text_r1"] == pytest.approx(2 / 3) and recall["image_to_text_r2"] == 1.0
    # caption 0 ranks image 1 first (0.9): a miss at 1, a hit at 2; captions 1, 3 find theirs; caption 2 ranks
    # image 2 (0.3) above image 1 (0.2): a miss at 1.
    assert recall["text_to_image_r1"] == pytest.approx(2 / 4) and recall["text_to_image_r2"] == 1.0
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        multi_caption_recall(images, texts, torch.tensor([0, 0, 1, 1]))


def test_a_collapsed_model_retrieves_nothing():
    same = F.normalize(torch.ones(6, 4), dim=1)
    recall = retrieval_recall(same, same.clone(), ks=(1, 5))
    assert recall["image_to_text_r1"] == 0.0 and recall["text_to_image_r5"] == 0.0


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="share d"):
        zeroshot_accuracy(torch.ones(2, 3), torch.ones(4, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        zeroshot_accuracy(torch.ones(2, 3), torch.ones(4, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="both be"):
        retrieval_recall(torch.ones(3, 2), torch.ones(4, 2))


# ----------------------------------------------------------------------------- a saved model, end to end

CLASSES = ["red", "green", "blue", "yellow"]
TEMPLATE = "a photo of a {}."


class FakeSource(Source):
    """A `siglip.data.Source` of given samples with one labelled task."""

    name = "fake"

    def __init__(self, samples: list[Sample], templates: list[str]):
        self.tasks = {"label": list(CLASSES)}
        self.templates = {"label": templates}
        self.samples = samples

    def test_samples(self) -> list[Sample]:
        return self.samples


def random_images(count: int) -> list[Image.Image]:
    return [Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()) for _ in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A SigLIP of ours saved as `siglip train` saves DIR/final (the tiny preset's conventions, at width 32)."""
    from siglip import checkpoint
    from siglip.model import build_model
    from siglip.tokenizer import build_processor, train_tokenizer

    captions = [f"a photo of a {c} square" for c in CLASSES] * 20 + [TEMPLATE.format(c) for c in CLASSES]
    tokenizer = train_tokenizer(captions, vocab_size=128, max_length=16)
    model = build_model("tiny", vocab_size=len(tokenizer), max_text_length=16)
    small = SiglipModel(SiglipConfig(
        text_config={**model.config.text_config.to_dict(), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "projection_size": 32},
        vision_config={**model.config.vision_config.to_dict(), "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2}))
    small.config.text_config.mask_pad_tokens = True
    with torch.no_grad():
        small.logit_scale.copy_(model.logit_scale)
        small.logit_bias.copy_(model.logit_bias)
    run = tmp_path_factory.mktemp("run")
    checkpoint.export_final(small, build_processor(tokenizer, image_size=32), run / "final")
    return run


def test_pipeline_scores_and_top_class_agree_with_evaluate(model_dir):
    from transformers import AutoModel, pipeline

    from siglip.model import load_model, scale_and_bias

    assert type(AutoModel.from_pretrained(model_dir / "final")).__name__ == "SiglipModel"
    classifier = pipeline("zero-shot-image-classification", model=str(model_dir / "final"))
    model, processor = load_model(str(model_dir))
    images = random_images(4)
    class_features = class_embeddings(model, processor, CLASSES, [TEMPLATE], batch_size=8)
    image_features = embed_images(model, processor, images, batch_size=4)
    t, b = (value.item() for value in scale_and_bias(model))
    ours = torch.sigmoid(t * image_features @ class_features.T + b)            # (images, classes)
    top_labels = []
    for row, image in enumerate(images):
        answer = classifier(image, candidate_labels=CLASSES, hypothesis_template=TEMPLATE)
        scores = torch.tensor([next(a["score"] for a in answer if a["label"] == c) for c in CLASSES],
                              dtype=torch.float64)
        # The same probabilities: tokenisation (64 tokens, left-padded, masked), resizing and t, b all agree.
        assert torch.allclose(scores, ours[row].double(), rtol=1e-4, atol=1e-7)
        top_labels.append(CLASSES.index(answer[0]["label"]))
    assert top_labels == ours.argmax(dim=1).tolist()
    # evaluate's zero-shot prediction is the pipeline's top class for every image.
    samples = [Sample(image=image, caption="x", key=f"fake/{i}", labels={"label": label}, positive_id=label)
               for i, (image, label) in enumerate(zip(images, top_labels, strict=True))]
    result = evaluate(model, processor, FakeSource(samples, [TEMPLATE]), "zeroshot", batch_size=4)
    assert result["accuracy"] == 1.0
    assert result["per_task"]["label"] == {"accuracy": 1.0, "chance": 0.25, "classes": 4, "n": 4}


def test_evaluate_returns_the_contract_json(model_dir):
    from siglip.model import load_model

    model, processor = load_model(str(model_dir / "final"))
    model.train()
    n = 9
    images = random_images(n)
    samples = [Sample(image=image, caption=TEMPLATE.format(CLASSES[i % 4]), key=f"fake/{i}",
                      labels={"label": i % 4} if i < 7 else {}, positive_id=i % 4) for i, image in enumerate(images)]
    source = FakeSource(samples, ["a {}.", TEMPLATE, "{}"])
    zeroshot = evaluate(model, processor, source, "zeroshot", batch_size=4)
    assert model.training                                             # the caller's mode is restored
    assert set(zeroshot) >= {"task", "accuracy", "chance", "n", "per_task"} and zeroshot["task"] == "zeroshot"
    assert zeroshot["n"] == 7                                         # only the samples carrying the label
    assert zeroshot["chance"] == 0.25 and 0.0 <= zeroshot["accuracy"] <= 1.0
    # The prompt ensemble: the class embedding is the re-normalised mean over templates.
    ensemble = class_embeddings(model, processor, CLASSES, ["a {}.", TEMPLATE, "{}"], batch_size=5)
    singles = [class_embeddings(model, processor, CLASSES, [t], batch_size=5) for t in ["a {}.", TEMPLATE, "{}"]]
    assert torch.allclose(ensemble, F.normalize(sum(singles) / 3, dim=1), atol=1e-5)
    retrieval = evaluate(model, processor, source, "retrieval", batch_size=4)
    keys = {f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert set(retrieval) >= keys | {"task", "n"} and retrieval["task"] == "retrieval" and retrieval["n"] == n
    assert all(0.0 <= retrieval[key] <= 1.0 for key in keys)
    assert retrieval["image_to_text_r10"] == 1.0                      # 4 distinct captions: all within 10
    assert json.loads(json.dumps(zeroshot)) == zeroshot and math.isfinite(retrieval["text_to_image_r1"])
    with pytest.raises(UserError, match="task must be one of zeroshot, retrieval"):
        evaluate(model, processor, source, "captioning")
    source.tasks = {}
    with pytest.raises(UserError, match="no zero-shot labels.*--task retrieval"):
        evaluate(model, processor, source, "zeroshot")


def test_siglip_eval_prints_one_json_object(model_dir, capsys):
    from siglip.cli import main

    assert main(["eval", str(model_dir), "--data", "digits", "--json"]) == 0
    output = capsys.readouterr().out.strip().splitlines()
    assert len(output) == 1
    result = json.loads(output[0])
    assert result["task"] == "zeroshot" and list(result["per_task"]) == ["digit"]
    assert result["per_task"]["digit"]["classes"] == 10 and result["chance"] == pytest.approx(0.1)


def labelled_table(folder, header: str = "filepath,caption,label") -> list[str]:
    """Eight random images of the four CLASSES in a table with these column names and a class-names file: the
    --data and --classes flags that read them."""
    rows = [header]
    for number, image in enumerate(random_images(8)):
        image.save(folder / f"{number}.png")
        label = random.randrange(4)
        rows.append(f"{number}.png,a photo of a {CLASSES[label]} square,{label}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    (folder / "names.txt").write_text("\n".join(CLASSES) + "\n")
    return ["--data", str(folder / "pairs.csv"), "--classes", str(folder / "names.txt")]


def test_siglip_eval_reads_a_table_with_classes_and_templates_files(model_dir, tmp_path, capsys):
    from siglip.cli import main

    data = labelled_table(tmp_path)
    (tmp_path / "prompts.txt").write_text("a {} square\n" + TEMPLATE + "\n")
    assert main(["eval", str(model_dir), *data, "--templates", str(tmp_path / "prompts.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["per_task"]["label"]["classes"] == 4
    assert main(["eval", str(model_dir / "final"), *data, "--task", "retrieval"]) == 0
    table = capsys.readouterr().out
    assert "retrieval on" in table and "R@1" in table and "image -> text" in table


def test_siglip_eval_on_a_wrong_directory_is_one_line_and_exit_2(tmp_path, capsys):
    from siglip.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert main(["eval", str(tmp_path), "--data", "digits"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'bert' model" in error and "BertModel" in error


@pytest.mark.parametrize("kind", ["siglip", "siglip2", "naflex"])
def test_pipeline_probabilities_equal_ours_on_google_checkpoints(tmp_path, kind):
    """transformers' zero-shot pipeline on a SigLIP v1, SigLIP 2 or NaFlex checkpoint gives sigmoid(t cos + b) of
    our embeddings: the right-padded 64 tokens without a mask, the resize (or the patch budget), t and b agree."""
    from transformers import pipeline

    from google_checkpoints import build_checkpoint
    from siglip.model import load_model, scale_and_bias

    directory = build_checkpoint(kind, tmp_path / kind)
    classifier = pipeline("zero-shot-image-classification", model=str(directory))
    model, processor = load_model(str(directory))
    labels = ["red circle", "two dogs", "a star on the grass"]
    images = [Image.fromarray(torch.randint(0, 256, (int(torch.randint(9, 50, ())), int(torch.randint(9, 50, ())), 3),
                                            dtype=torch.uint8).numpy()) for _ in range(3)]      # mixed aspect ratios
    class_features = class_embeddings(model, processor, labels, ["{}"], batch_size=8)
    image_features = embed_images(model, processor, images, batch_size=2)
    t, b = (value.item() for value in scale_and_bias(model))
    ours = torch.sigmoid(t * image_features @ class_features.T + b).double()             # (images, labels)
    for row, image in enumerate(images):
        answer = classifier(image, candidate_labels=labels, hypothesis_template="{}")
        scores = torch.tensor([next(a["score"] for a in answer if a["label"] == c) for c in labels],
                              dtype=torch.float64)
        # float32 on both sides, batched differently: 1e-4 relative (measured below 1e-5).
        assert torch.allclose(scores, ours[row], rtol=1e-4, atol=1e-9), (scores, ours[row])


def write_image_folder(root, classes: dict[str, int]):
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for number in range(count):
            Image.fromarray(torch.randint(0, 256, (20, 28, 3), dtype=torch.uint8).numpy()).save(
                root / name / f"{number}.png")
    return root


def test_siglip_eval_on_an_image_folder(model_dir, tmp_path, capsys):
    from siglip.cli import main

    folder = write_image_folder(tmp_path / "val", {"n02": 2, "n01": 3, "n03": 1})
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")                      # sorted folder order
    assert main(["eval", str(model_dir), "--data", str(folder), "--classes", str(tmp_path / "names.txt"),
                 "--templates", str(tmp_path / "names.txt").replace("names", "templates"), "--json"]) == 2
    assert "templates file" in capsys.readouterr().err                            # a missing file: exit 2
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    assert main(["eval", str(model_dir), "--data", str(folder), "--classes", str(tmp_path / "names.txt"),
                 "--templates", str(tmp_path / "templates.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 6 and result["per_task"]["label"]["classes"] == 3 and result["chance"] == pytest.approx(1 / 3)
    assert result["skipped"] == {}
    (folder / "n04").mkdir()                                                       # an empty class folder
    assert main(["eval", str(model_dir), "--data", str(folder)]) == 2
    assert "class folder" in capsys.readouterr().err


def test_siglip_eval_retrieval_with_several_captions_per_image(model_dir, tmp_path, capsys):
    from siglip.cli import main

    rows = ["image,caption"]
    for number, image in enumerate(random_images(4)):
        image.save(tmp_path / f"{number}.png")
        rows += [f"{number}.png,a photo of a {CLASSES[number]} square", f"./{number}.png,a {CLASSES[number]} thing"]
    rows += ["3.png,a third caption of image 3", "0.png,", "missing.png,an image that is not there"]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "captions.csv"), "--task", "retrieval",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["captions"] == 9                 # 4 images; 2 + 2 + 2 + 3 captions
    assert result["skipped"] == {"empty_caption": 1, "missing_file": 1}
    assert result["image_to_text_r10"] == 1.0 and result["text_to_image_r5"] == 1.0    # 4 images, 9 captions


def test_evaluate_skips_and_counts_a_naflex_image_below_one_patch(tmp_path):
    from google_checkpoints import build_checkpoint
    from siglip.model import load_model

    model, processor = load_model(str(build_checkpoint("naflex", tmp_path / "naflex")))
    sizes = [(20, 30), (5, 40), (30, 7), (16, 16)]                        # patch 8: two images are too small
    samples = [Sample(image=Image.new("RGB", size, (9 * i, 0, 0)), caption=f"a {CLASSES[i]} square", key=f"s{i}",
                      labels={"label": i}, positive_id=i) for i, size in enumerate(sizes)]
    source = FakeSource(samples, [TEMPLATE])
    zeroshot = evaluate(model, processor, source, "zeroshot", batch_size=3)
    assert zeroshot["n"] == 2 and zeroshot["skipped"] == {"image_too_small": 2}
    retrieval = evaluate(model, processor, source, "retrieval", batch_size=3)
    assert retrieval["n"] == 2 and retrieval["captions"] == 2 and retrieval["skipped"] == {"image_too_small": 2}


def test_siglip_eval_defaults_to_the_models_image_size_and_any_device(model_dir, monkeypatch, capsys):
    """The built-in worlds are drawn at the size the model was trained at (32 here), not at their own 64."""
    import siglip.data
    from siglip.cli import main, parser

    seen = {}
    real_open_source = siglip.data.open_source

    def spy(spec, **options):
        seen.update(options)
        return real_open_source(spec, **options)

    monkeypatch.setattr(siglip.data, "open_source", spy)
    assert main(["eval", str(model_dir), "--data", "digits", "--json"]) == 0
    assert seen["image_size"] == 32
    assert parser("eval").parse_args(["eval", "x", "--data", "shapes"]).device == "auto"   # as siglip train


@pytest.mark.parametrize("damage", ["spiece.model", "tokenizer_config.json"])
def test_a_checkpoint_whose_tokenizer_cannot_be_read_is_one_line_and_exit_2(tmp_path, capsys, damage):
    from google_checkpoints import build_checkpoint
    from siglip.cli import main

    directory = build_checkpoint("siglip", tmp_path / "v1")
    (directory / damage).write_bytes(b"\x00not a tokenizer file" * 10)
    assert main(["eval", str(directory), "--data", "digits"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "cannot load the processor" in error and str(directory) in error


def test_siglip_eval_reads_a_table_of_other_column_names_with_the_column_flags(model_dir, tmp_path, capsys):
    from siglip.cli import main

    data = labelled_table(tmp_path, header="picture,words,y")
    assert main(["eval", str(model_dir), *data]) == 2
    error = capsys.readouterr().err.strip()
    assert "no image column" in error and "--image-column" in error and "picture" in error
    columns = ["--image-column", "picture", "--caption-column", "words", "--label-column", "y"]
    assert main(["eval", str(model_dir), *data, *columns, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["per_task"]["label"]["classes"] == 4

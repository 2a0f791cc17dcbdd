"""Same view for teacher and student (issue 12): one random geometry per sample, each model's own finishing."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_cifd.data import load_image_dataset
from hf_cifd.data.views import SharedView, finish_of


def gradient_image(w=120, h=90):
    """R encodes x, G encodes y: a crop's mean R / G is its centre, their spread its size."""
    x = np.tile(np.linspace(0, 255, w), (h, 1))
    y = np.tile(np.linspace(0, 255, h)[:, None], (1, w))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def unnormalise(t, finish):
    return t * torch.tensor(finish.std)[:, None, None] + torch.tensor(finish.mean)[:, None, None]


def region(t, finish):
    """(centre x, centre y, x spread, left-to-right direction) of a crop of the gradient image."""
    img = unnormalise(t, finish)
    r, g = img[0], img[1]
    half = r.shape[1] // 2
    return torch.stack([r.mean(), g.mean(), r.max() - r.min(), (r[:, -half:].mean() - r[:, :half].mean()).sign()])


def timm_pair():
    from timm.data import create_transform

    student = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225), crop_pct=0.875)
    teacher = dict(input_size=(3, 56, 56), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                   crop_pct=0.95)
    return (create_transform(**student, is_training=True), create_transform(**student),
            create_transform(**teacher))


def assert_same_crops(view, n=30, tol=0.03, spread_tol=None):
    img = gradient_image()
    regions = []
    for _ in range(n):
        s, t = view(img)
        assert t is not None and s.shape[-1] != t.shape[-1]
        rs, rt = region(s, view.student), region(t, view.teacher)
        assert torch.allclose(rs[:2], rt[:2], atol=tol), (rs, rt)  # same centre
        assert abs(rs[2] - rt[2]) <= (spread_tol or tol), (rs, rt)  # same extent (blurred at low resolution)
        assert rs[3] == rt[3]  # flipped together
        regions.append(rs)
    return torch.stack(regions)


def test_timm_pair_teacher_and_student_tensors_come_from_the_same_random_crop():
    s_train, s_eval, t_eval = timm_pair()
    view = SharedView(s_train, s_eval, t_eval, train=True, seed=0)
    assert view.resized_crop == ((0.08, 1.0), (0.75, 4 / 3)) and view.flip == 0.5
    assert [type(x).__name__ for x in view.extra] == ["ColorJitter"]
    view.extra = []  # colour jitter changes R/G; the geometry is what is checked here
    regions = assert_same_crops(view)
    assert regions[:, 0].std() > 0.05 and set(regions[:, 3].tolist()) == {-1.0, 1.0}  # crops and flips vary
    # independent transforms (the old behaviour) do not agree
    s, t = s_train(gradient_image()), t_eval(gradient_image())
    assert not torch.allclose(region(s, view.student)[:3], region(t, view.teacher)[:3], atol=0.03)


def test_eval_view_is_the_students_centre_crop_for_both():
    s_train, s_eval, t_eval = timm_pair()
    view = SharedView(s_train, s_eval, t_eval, train=False)
    s, t = view(gradient_image())
    rs, rt = region(s, view.student), region(t, view.teacher)
    assert torch.allclose(rs[:3], rt[:3], atol=0.02)
    # the student's own eval transform gives the same student tensor
    torch.testing.assert_close(s, s_eval(gradient_image()), atol=0.05, rtol=0)
    assert abs(rs[2].item() - 0.875 * 90 / 120) < 0.03  # central square of crop_pct x the shorter side


def test_open_clip_pair_and_plain_cnn_pad_crop_share_the_view():
    import open_clip

    from hf_cifd.adapters import adapter_for
    from hf_cifd.models import SimpleCNN

    s_train = open_clip.image_transform(32, is_train=True)
    s_eval = open_clip.image_transform(32, is_train=False)
    t_eval = open_clip.image_transform(48, is_train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    view = SharedView(s_train, s_eval, t_eval, train=True, seed=1)
    assert view.resized_crop[0] == (0.9, 1.0)
    assert_same_crops(view)
    student, teacher = SimpleCNN.from_table8("cnn2"), SimpleCNN.from_table8("cnn4", input_size=48)
    a = adapter_for(student)
    view = SharedView(a.image_transform(student, True), a.image_transform(student, False),
                      a.image_transform(teacher, False), seed=2)
    assert view.resized_crop is None and view.pad == pytest.approx(4 / 32)
    assert_same_crops(view, tol=0.05)


def test_same_finishing_gives_no_teacher_tensor():
    s_train, s_eval, _ = timm_pair()
    view = SharedView(s_train, s_eval, s_eval)
    assert view.same and view(gradient_image())[1] is None


def test_dataset_loader_emits_both_tensors_from_one_view():
    import datasets

    s_train, s_eval, t_eval = timm_pair()
    view = SharedView(s_train, s_eval, t_eval, train=True, seed=0)
    view.extra = []
    imgs = [gradient_image(120 + 10 * i, 90) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": list(range(6)), "__key__": [f"k{i}" for i in range(6)]})
    data = load_image_dataset("local", task="classification", dataset=ds, streaming=False, image_column="image",
                              label_column="label", key_column="__key__", view=view)
    for i in range(6):
        sample = data[i]
        rs, rt = region(sample["pixel_values"], view.student), region(sample["teacher_pixel_values"], view.teacher)
        assert torch.allclose(rs[:3], rt[:3], atol=0.03) and rs[3] == rt[3]
    with pytest.raises(Exception, match="either view="):
        load_image_dataset("local", task="classification", dataset=ds, streaming=False, image_column="image",
                           label_column="label", transform=s_train, view=view)


def test_finish_reads_size_interpolation_and_normalisation():
    _, s_eval, t_eval = timm_pair()
    finish, fraction = finish_of(t_eval)
    assert finish.size == (56, 56) and finish.mean == (0.5, 0.5, 0.5) and finish.std == (0.25, 0.25, 0.25)
    assert fraction == pytest.approx(56 / int(56 / 0.95)) and finish.interpolation.value == "bilinear"


def test_pipeline_builds_shared_views_when_preprocessing_differs(tmp_path):
    from hf_cifd.pipeline import _Run, parse_classification_args

    args, config = parse_classification_args(None, None, ["--output_dir", str(tmp_path / "o"), "--teacher", "timm:resnet18",
                                              "--student", "cnn:cnn2", "--num_classes", "10", "--use_cpu", "true", "--teacher_pretrained", "false",
                                              "--report_to", "none"])
    run = _Run(args, config)
    run.models()
    train, evaluate = run.views
    assert isinstance(train, SharedView) and train.train and not evaluate.train
    assert train.student.size == (32, 32) and train.teacher.size == (224, 224) and train.pad == pytest.approx(1 / 8)
    assert_same_crops(train, n=5, tol=0.02, spread_tol=0.1)  # 32 px vs 224 px renderings of one crop


def test_progressive_resolution_follows_ffcv_and_reaches_the_student(tmp_path):
    from hf_cifd import DistillationConfig, DistillationInputError, DistillationTrainer
    from hf_cifd.data.views import progressive_resolution

    # ffcv rn18 88 epochs: 160 up to epoch 65, 192 from 76, linear in between, multiples of 32
    assert [progressive_resolution(e, 160, 192, 65, 76) for e in (0, 65, 70, 71, 76, 87)] == [160, 160, 160, 192, 192, 192]
    from test_indistill import TinyCNN

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"pixel_values": torch.randn(3, 64, 64), "labels": i % 4}

    seen = []
    student = TinyCNN(seed=2)
    student.conv1.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[-1]) if m.training else None)
    args = DistillationConfig(output_dir=str(tmp_path / "o"), method="kd", per_device_train_batch_size=8,
                              num_train_epochs=3, progressive_resolution=[32, 64, 0, 2], report_to=[], use_cpu=True,
                              save_strategy="no", disable_tqdm=True)
    DistillationTrainer(student, TinyCNN(seed=1), args=args, train_dataset=Data()).train()
    assert seen == [32, 64, 64]  # epoch 0: min; epoch 1: 48 -> rounded to 64; epoch 2: max
    with pytest.raises(DistillationInputError, match="progressive_resolution is"):
        DistillationConfig(output_dir=str(tmp_path / "o"), progressive_resolution=[192, 160, 0, 1], report_to=[])

"""CIFD on CIFAR-100 with the paper's simple CNNs (Table 1, Appendix A.1.1 / Table 8): 10-layer CNN -> 2-layer CNN.

    accelerate launch recipes/cifar100_cnn10_to_cnn2.py --output_dir runs/cifar_cnn10_cnn2
    accelerate launch recipes/cifar100_cnn10_to_cnn2.py --teacher cnn:runs/cifar_cnn10_cnn2/teacher --output_dir runs/b
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml recipes/cifar100_cnn10_to_cnn2.py --output_dir runs/x
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/cifar100_cnn10_to_cnn2.py --smoke --output_dir /tmp/smoke  # 2 CPU processes

The teacher: ``--teacher cnn:<dir>`` loads a trained 10-layer CNN (``SimpleCNN.from_pretrained``, e.g. the
``<output_dir>/teacher`` of an earlier run). With the default ``--teacher cnn:cnn10`` (a Table 8 name, no weights
exist) the recipe first trains it from scratch with cross-entropy on the same data and schedule and saves it to
``<output_dir>/teacher`` (``--train_teacher``, unset = auto; ``--teacher_epochs`` / ``--teacher_max_steps`` set its length).

Defaults (``recipes/configs/cifar100_cnn10_to_cnn2.yaml``; each overridable by its flag or ``--config my.yaml``;
``uoft-cs/cifar100``, columns img / fine_label, evaluated on the test split; the paper tuned the student's
hyperparameters with Optuna and does not list them all for Table 1, so the values of its CIFAR-100 Table 2 setup
(A.1.2) are used): SGD momentum 0.9, lr 0.05 divided by 10 at epochs 150, 160, 180, 240 epochs, batch 64, weight
decay 1e-4 (A.1.1), tau 2, all lambdas 1, KD dropout 0.25, embedding-loss weight 100 (MSE), IBM with lambda_I 0.005;
3 RDMs with R = 1.0, 0.8, 0.6 on the teacher's FC512 embedding: hidden layers FC512, FC306, FC100 with the bottleneck
after FC306 (``--rdm_hidden_dims 512 306 100 --rdm_bottleneck_after 2``), MSE distortion, a FC100 classifier head,
trained 30 epochs from the cached teacher outputs. The student is exported with ``save_pretrained`` to
``<output_dir>/student`` (``SimpleCNN.from_pretrained``). ``--smoke``: see :mod:`hf_cifd.pipeline` (shapes data,
the cnn10 teacher trained for 10 steps first).
"""

SMOKE = {}  # --smoke: random-init models (on top of hf_cifd.pipeline.SMOKE_DEFAULTS)


def main():
    from hf_cifd.pipeline import recipe_main

    recipe_main(__file__, SMOKE)


if __name__ == "__main__":
    main()

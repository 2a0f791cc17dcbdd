"""CIFD on CIFAR-100 with the paper's simple CNNs (Table 1, Appendix A.1.1 / Table 8): 10-layer CNN -> 2-layer CNN.

    accelerate launch recipes/cifar100_cnn10_to_cnn2.py --output_dir runs/cifar_cnn10_cnn2
    accelerate launch recipes/cifar100_cnn10_to_cnn2.py --teacher cnn:runs/cifar_cnn10_cnn2/teacher --output_dir runs/b
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml recipes/cifar100_cnn10_to_cnn2.py --output_dir runs/x
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/cifar100_cnn10_to_cnn2.py --smoke --output_dir /tmp/smoke  # 2 CPU processes

The teacher: ``--teacher cnn:<dir>`` loads a trained 10-layer CNN (``SimpleCNN.from_pretrained``, e.g. the
``<output_dir>/teacher`` of an earlier run). With the default ``--teacher cnn:cnn10`` (a Table 8 name, no weights
exist) the recipe first trains it from scratch with cross-entropy on the same data and schedule and saves it to
``<output_dir>/teacher`` (``--train_teacher``; ``--teacher_epochs`` / ``--teacher_max_steps`` set its length).

Defaults (``uoft-cs/cifar100``, columns img / fine_label, evaluated on the test split; the paper tuned the student's
hyperparameters with Optuna and does not list them all for Table 1, so the values of its CIFAR-100 Table 2 setup
(A.1.2) are used): SGD momentum 0.9, lr 0.05 divided by 10 at epochs 150, 160, 180, 240 epochs, batch 64, weight
decay 1e-4 (A.1.1), tau 2, all lambdas 1, KD dropout 0.25, embedding-loss weight 100 (MSE), IBM with lambda_I 0.005;
3 RDMs with R = 1.0, 0.8, 0.6 on the teacher's FC512 embedding: hidden layers FC512, FC306, FC100 with the bottleneck
after FC306 (``--rdm_hidden_dims 512 306 100 --rdm_bottleneck_after 2``), MSE distortion, a FC100 classifier head,
trained 30 epochs from the cached teacher outputs. The student is exported with ``save_pretrained`` to
``<output_dir>/student`` (``SimpleCNN.from_pretrained``). ``--smoke``: see :mod:`hf_cifd.pipeline` (shapes data,
the cnn10 teacher trained for 10 steps first).
"""

import os
import sys


DEFAULTS = {
    "--teacher": "cnn:cnn10", "--student": "cnn:cnn2", "--num_classes": "100", "--teacher_pretrained": "false",
    "--dataset": "uoft-cs/cifar100", "--image_column": "img", "--label_column": "fine_label", "--eval_split": "test",
    "--streaming": "false", "--method": "cifd", "--optim": "sgd", "--optim_args": "momentum=0.9",
    "--learning_rate": "0.05", "--lr_milestones": ["150", "160", "180"], "--lr_gamma": "0.1",
    "--num_train_epochs": "240", "--per_device_train_batch_size": "64", "--per_device_eval_batch_size": "256",
    "--weight_decay": "1e-4", "--temperature": "2", "--lambda_ce": "1", "--lambda_kl": "1", "--kd_dropout": "0.25",
    "--embedding_weight": "100", "--embedding_distortion": "mse", "--use_ibm": "true", "--lambda_ibm": "0.005",
    "--num_rdms": "3", "--rdm_rates": ["1.0", "0.8", "0.6"], "--rdm_hidden_dims": ["512", "306", "100"],
    "--rdm_bottleneck_after": "2", "--rdm_activation_after": ["1", "3"], "--rdm_distortion": "mse",
    "--rdm_epochs": "30", "--output_dir": "runs/cifar100_cnn10_to_cnn2", "--dataloader_num_workers": "4",
    "--logging_steps": "100", "--save_strategy": "epoch", "--save_total_limit": "2",
}
SMOKE = {"--teacher_max_steps": "10"}


def _teacher_arg(argv):
    for i, a in enumerate(argv):
        if a == "--teacher" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--teacher="):
            return a.split("=", 1)[1]
    return DEFAULTS["--teacher"]


def main():
    from hf_cifd.pipeline import parse_recipe_args, run_classification

    # Train the teacher first unless --teacher names a trained model directory.
    trained = os.path.isdir(_teacher_arg(sys.argv[1:]).partition(":")[2])
    recipe_args, config = parse_recipe_args({**DEFAULTS, "--train_teacher": "false" if trained else "true"}, SMOKE)
    run_classification(recipe_args, config)


if __name__ == "__main__":
    main()

"""Fine-tuning recipe entry point for `accelerate launch`; the recipe is slimfit_accel/finetune.py.

The same code as `slimfit-accel finetune` and `python -m slimfit_accel.finetune`:

    accelerate launch --config_file accelerate_configs/zero2.yaml launch/finetune.py \
        --train-file reviews.csv --text-column review --label-column stars --model ./my-bert \
        --slimfit-config launch/configs/demo.yaml --output-dir runs/reviews
"""

from slimfit_accel.finetune import cli

if __name__ == "__main__":
    cli()

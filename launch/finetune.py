"""Fine-tuning recipe entry point for `accelerate launch`; the recipe is slimfit_accel/finetune.py.

    accelerate launch --config_file accelerate_configs/cpu.yaml launch/finetune.py \
        --slimfit-config launch/configs/demo.yaml
"""

from slimfit_accel.finetune import cli

if __name__ == "__main__":
    cli()

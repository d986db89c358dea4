"""SAM-Med3D MONAI Label app library: configs, infer task, trainer, active learning."""

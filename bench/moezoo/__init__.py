"""The tiny MoE zoo: MoE from task fine-tunes vs their merge, and halving its experts (issue 22)."""

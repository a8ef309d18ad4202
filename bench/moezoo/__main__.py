"""``python -m bench.moezoo``: build the tiny MoE zoo in code and print its table."""

from bench.moezoo.run import main

main()

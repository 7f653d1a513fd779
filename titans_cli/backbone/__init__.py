"""The backbone layer: the memory-update op (`ops/`), `NeuralMemory` (memory.py) and `Titans` (model.py).

It imports torch and the standard library only, never the engine, the tasks or the commands (tests/test_layers.py).
"""

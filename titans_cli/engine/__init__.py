"""The engine layer: configuration, training, evaluation, checkpoints and run directories.

It builds on the backbone and never imports the tasks, the data recipes or the commands: a task reaches it as an
argument (`train.run(task, ...)`, a `get_task` lookup), its interface written down in engine/task.py
(tests/test_layers.py checks the imports).
"""

"""``tlaunch doctor``: run a script for a few instrumented steps and report the bugs found.

- :mod:`tlaunch.doctor.command` — the command: its flags, the launch, the verdict.
- :mod:`tlaunch.doctor.hooks` — the instruments, installed in each worker before the script.
- :mod:`tlaunch.doctor.fixed_batch` — the one-batch phase behind ``cannot-overfit``.
- :mod:`tlaunch.doctor.findings`, :mod:`tlaunch.doctor.hardware` — the rules.
- :mod:`tlaunch.doctor.report` — the table and the JSON.

Importing this package imports nothing else: the workers' ``sitecustomize`` reaches
:mod:`tlaunch.doctor.hooks` through it.
"""

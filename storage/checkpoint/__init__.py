"""Checkpoints at a URL: the step-directory format, its commit protocol, saving and resuming.

Owns everything under ``--checkpoint-dir``. The entry points, imported from
``tlaunch.storage`` (this package's ``__init__`` stays empty, so importing a module of it loads
no more than that module)::

    CheckpointStore        store.py      save, discover "latest", verify, load, quarantine, delete
    AsyncCheckpointWriter  writer.py     two-phase saving: cpu_snapshot, then a background commit
    RetentionPolicy        retention.py  which committed steps to delete (keep last/every/best)
    load_weights           export.py     one model's weights from step N, best or last; read-only
    ckpt_main              cli.py        ``tlaunch ckpt ls|verify|export``

Beneath them: ``manifest.py`` (what a step directory holds and how it is proven whole),
``records.py`` (COMMIT and MANIFEST as read back: parsed field by field, never trusted),
``commit.py`` (how a step becomes visible, per backend), ``discovery.py`` (one listing of a
checkpoint URL), ``reading.py`` (reading a step back, and the quarantine rule: only bytes read
whole and proven wrong quarantine), ``serialize.py`` (safetensors and weights-only torch files;
torch is imported only inside its functions), ``threads.py`` (plain threads for concurrent I/O).
"""

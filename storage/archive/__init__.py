"""Data archives: pack a dataset folder to a URL once, fetch it on every machine that trains.

Owns ``tlaunch data`` and ``--data``. The entry points, imported from ``tlaunch.storage`` (this
package's ``__init__`` stays empty, so importing a module of it loads no more than that
module)::

    pack(DIR, URL)         pack.py    zstd tar shards + MANIFEST.json, uploading only what is new
    fetch(URL[, DEST])     fetch.py   download, verify and unpack into this machine's cache
    info(URL)              fetch.py   what an archive holds, and whether this machine has it
    data_main              cli.py     ``tlaunch data pack|fetch|ls``

Beneath them: ``format.py`` (the manifest, content ids, tar headers, the zstd binding),
``sources.py`` (listing and planning a folder), ``compress.py`` (one shard into parallel zstd
frames), ``stream.py`` (one shard downloaded by ranged reads in flight, its frames released to
the unpackers as they land), ``frames.py`` and ``unpack.py`` (one shard out again, refusing
anything but the files the manifest lists, each checked against its digest), ``cache.py`` (this machine's cache: an
entry counts once whole and durable, and is checked on every hit). Storage goes through :func:`tlaunch.storage.store.resolve`, so every URL it knows
works here: paths, ``gs://``, ``s3://``, ``drive://``, ``memory://``.
"""

"""The model registry: immutable, content-addressed versions in the Triton model repository.

A version folder (`model_repository/<model>/<N>/`) is written once, by `publish`, and never
changed; the only mutable facts are which versions the route files name (what is live) and the
validation reports that say whether a version may take traffic. Modules:

    layout      the artifact-dir layout publish reads, and where reports/warm-up files live
    digest      sha256 of files and the version digest over them
    histograms  training feature histograms with bins from training quantiles
    manifest    the manifest a publish writes (memory footprint, backend, golden inputs ...)
    publish     copy an artifact into the next version folder, atomically, never overwriting
    inventory   list / verify / retire versions, and where each is live in the routes
    report      validation.json: read, write, and the gate that refuses unvalidated versions
    validate    the checks behind a report, against a real tritonserver
    warmup      Triton `model_warmup` generated from golden inputs
    cli         `python -m gateway models ...`
"""

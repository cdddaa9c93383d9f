"""Applications built on the bgmask library: the `bgmask` command, the entry scripts' bodies, the demo, the
model zoo's pretraining, the mask-quality sweep and the report. Each imports the library (bgmask.*) and never
another application's internals."""

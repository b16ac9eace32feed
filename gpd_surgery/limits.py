"""Every bound gpd puts on what it reads (files, plans, options), in one place (docs/usage.md, Safety model).

Each keeps a size from a file or an option within what torch's int64 indexing, seeding and this
machine can take, so that bad input is one clear error before anything is allocated.
"""
MAX_INT = 2**62  # sizes in a plan and shapes in a file
MAX_SEED = 2**32 - 1
MAX_DIMS = 8  # dims of a tensor in a plan, and of --input-shape
MAX_DEPTH = 64  # nesting of a plan's layouts
MAX_PARTS = 4096  # spaces in one layout: real ones have a few (groups x channels), concatenations dozens
MAX_INPUT = 2**31  # values of the input shape a plan records (memory is checked again before any forward)
MAX_RATIO = 64.0  # a wider teacher would not train on any machine; bounds the maps built from a ratio
MAX_DIM = 2**31 - 1  # one size of --input-shape: kernels index int32 in places
MAX_INPUT_ELEMENTS = 2**36  # values of --input-shape: 256 GiB of float32, checked against free memory after
MAX_TEACHER_BYTES = 2**50  # 1 PiB: no machine holds it, refused even with --force
MAX_HEADER = 100 << 20  # a safetensors header is JSON text, never gigabytes (safetensors' own bound)

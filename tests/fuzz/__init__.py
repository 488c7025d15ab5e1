"""Mutation fuzzing of qcow2 images: where the structures are, how to break them, how to run a case.

- `targets`: find every structure of a pristine image (through the parsed `Image`) and list its
  fields as (offset, size, kind) so mutations hit real metadata, not random bytes of guest data.
- `mutate`: turn (seed, case index) into a deterministic `Case`: a list of byte patches (and maybe a
  truncation) applied to one sample image.
- `runner`: apply a case to a private copy of the image, run open/info/map/check/layout/read over it
  in a worker process with a time and memory bound, and classify the outcome.
"""

"""Mutation fuzzing of qcow2 images: where the structures are, how to break them, how to run a case.

- `targets`: find every structure of a pristine image (through the parsed `Image`) and list its
  fields as (offset, size, kind) so mutations hit real metadata, not random bytes of guest data.
- `mutate`: turn (seed, case index) into a deterministic `Case`: a list of byte patches (and maybe a
  truncation) applied to one sample image.
- `runner`: apply a case to a private copy of the image, run open/info/map/check/layout/read over it
  in a worker process with a time and memory bound, and classify the outcome.
- `amplify`: generators rather than mutations, for what mutation does not find: shared-table
  amplification (one L2 table behind millions of L1 entries, 65,536 snapshots on one L1 table,
  2,048 L1 copies over full L2 tables, 65,535 bitmaps on one table) and a million alternating
  extents; tests/test_amplification.py runs every command on each under the memory budget.
"""

"""Teacher datasets: recording a teacher's play into per-game HDF5 files and reading them back.

The only sub-package that imports h5py. See docs/datasets.md for the file format. One module per
concern, in the order data flows:
  schema        the file format: field tables, version, root attributes, `Episode`, `Compression`
  build_config  `DatasetConfig`: every `dataset build` setting, its default and source
  build         `dataset build`: checks, root attributes, opening the file, several games at once
  recorder      the play loop: lanes' turns -> episodes -> writer
  lanes         a vector env played by the teacher, here or in a helper process
  inference     the teacher's forward passes: in each lane, or one server process for all lanes
  packing       episodes -> the arrays a writer appends
  writer        the crash-safe writer (part files, atomic master, consolidation)
  background    the writer in a child process
  processes     helper processes that die with their parent
  reader        open, check and read a dataset (chunk cache, batches)
  verify        structural invariants and teacher outputs
  summary       `dataset info` and `dataset manifest`
  loader        training batches across games
"""

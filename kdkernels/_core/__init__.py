"""The shared core of every op: backends and dispatch (`backend`), integer codes shared
with the kernels (`codes`), input checks (`validate`), row chunking (`chunking`), the
custom-op decorator (`customop`), the row-loss autograd (`rowgrad`) and the CUDA
extension helpers (`cuda`). It imports from no op folder."""

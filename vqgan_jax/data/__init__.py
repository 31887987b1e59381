"""The input pipeline: `config.dataset` strings to sharded numpy batches.

    ds = build_dataset('digits', resolution=32)
    it = ds.train_iterator(batch_size=64, seed=0, start_step=step)
    for batch in prefetch_to_device(it, 2, NamedSharding(mesh, P('data'))):
      ...  # batch['image']: float32 (64, 32, 32, 3) in [-1, 1]; batch['label']

Dataset strings:
  'digits'              scikit-learn's 8x8 digits (shipped, no download),
                        enlarged; 'train' = first 90%, 'validation' = last 10%.
  'tfds:NAME[:SPLIT]'   a TFDS dataset prepared in `data_dir` (feature `image`,
                        optional `label`); SPLIT, when given, overrides `split`.
  'folder:PATH'         images found recursively under PATH; labels from the
                        sorted first-level subfolders when every image is in
                        one. `split` is ignored: use another folder to evaluate.

Preprocessing follows the reference: convert to RGB (or L), resize the
smallest side to `resolution` (PIL bicubic, antialiased when shrinking),
crop `resolution` square (random for training, centred for evaluation),
`x / 127.5 - 1`. `digits` and `folder:` never import TensorFlow; `tfds:`
imports tensorflow_datasets lazily (reading needs no TensorFlow either), an
optional install (`pip install -e '.[tfds]'`) that `check_dataset` asks for.
"""
from vqgan_jax.data.pipeline import Dataset
from vqgan_jax.data.pipeline import TrainIterator
from vqgan_jax.data.prefetch import make_global_batch
from vqgan_jax.data.prefetch import prefetch_to_device
from vqgan_jax.data.prefetch import ThreadPrefetcher

DATASET_FORMS = ("'digits'", "'tfds:NAME[:SPLIT]' (with data_dir)",
                 "'folder:PATH'")

__all__ = ['DATASET_FORMS', 'Dataset', 'ThreadPrefetcher', 'TrainIterator',
           'build_dataset', 'build_source', 'check_dataset',
           'make_global_batch', 'prefetch_to_device']


def build_source(dataset: str, *, split: str = 'train',
                 data_dir: str | None = None):
  """Resolves a dataset string to a random-access source.

  Args:
    dataset: see the module docstring.
    split: 'train' or 'validation' (digits: also 'test', 'all'; tfds: any
      split string of the dataset).
    data_dir: TFDS data_dir for 'tfds:' datasets.

  Returns:
    A `sources.Source`.

  Raises:
    ValueError: an unknown dataset string (the message lists the valid forms).
    FileNotFoundError: a missing or empty folder, or an unprepared TFDS
      dataset (the message says how to fix it).
  """
  check_dataset(dataset)
  kind, _, arg = dataset.partition(':')
  if dataset == 'digits':
    from vqgan_jax.data import sources
    return sources.digits_source(split)
  if kind == 'folder':
    from vqgan_jax.data import sources
    return sources.FolderSource(arg)
  from vqgan_jax.data import tfds_source
  return tfds_source.TfdsSource(arg, split, data_dir)


def check_dataset(dataset: str, field: str = 'dataset') -> None:
  """Raises a ValueError unless `dataset` has one of `DATASET_FORMS`
  (`field` names the config field in the message)."""
  kind, sep, arg = str(dataset).partition(':')
  if kind == 'tfds' and sep and arg:
    from vqgan_jax.data import tfds_source
    if not tfds_source.available():
      raise ValueError(f'config.{field}={dataset!r} {tfds_source.MISSING}')
    return
  if dataset == 'digits' or (kind == 'folder' and sep and arg):
    return
  raise ValueError(f'unknown dataset {dataset!r}; config.{field} must be one '
                   f'of {", ".join(DATASET_FORMS)}')


def build_dataset(dataset: str, *, resolution: int, split: str = 'train',
                  data_dir: str | None = None, channels: int = 3,
                  with_labels: bool = False,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  num_workers: int | None = None) -> Dataset:
  """Builds the dataset named by `config.dataset`, sharded for this process.

  Args:
    dataset: 'digits', 'tfds:NAME[:SPLIT]' or 'folder:PATH'.
    resolution: output height and width.
    split: 'train' or 'validation' (see `build_source`).
    data_dir: TFDS data_dir for 'tfds:' datasets.
    channels: 1 or 3.
    with_labels: require labels (class-conditional training); raises when
      the dataset has none. Labelled datasets always yield 'label'.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    num_workers: decoding threads.

  Returns:
    A `Dataset`.

  Raises:
    ValueError: unknown dataset string, bad arguments, or missing labels.
    FileNotFoundError: missing/empty folder or unprepared TFDS dataset.
  """
  source = build_source(dataset, split=split, data_dir=data_dir)
  if with_labels and not source.has_labels:
    raise ValueError(
        f'{source.name} has no labels but labels were requested; for '
        f'folder: put each class in its own first-level subfolder, for tfds: '
        f'use a dataset with a `label` feature.')
  return Dataset(source, resolution=resolution, channels=channels,
                 process_index=process_index, process_count=process_count,
                 num_workers=num_workers)

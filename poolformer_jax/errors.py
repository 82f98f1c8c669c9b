"""The errors a user can fix. Their messages say what to change, so the entry points (main.py,
convert_torch_weights.py) print them as one `error:` line; any other exception is a bug and
keeps its traceback."""


class Error(Exception):
  """Base of every error whose message tells the user what to do."""


class ConfigError(Error, ValueError):
  """A config, flag or environment that cannot work; raised before any expensive work."""


class DatasetError(Error, ValueError):
  """A dataset that is missing, unprepared or unreadable; the message says how to fix it."""


class CheckpointError(Error):
  """A checkpoint or model directory that cannot be read, verified or written as asked."""


class ConversionError(Error, ValueError):
  """A PyTorch checkpoint that cannot be converted; the message lists every problem."""


class ImageError(Error, ValueError):
  """An input that is not a readable image; the message names it."""


class BadImagesError(DatasetError):
  """Too many files of an image-folder split cannot be decoded; the message names them."""


class DiskFullError(CheckpointError):
  """A checkpoint could not be written for lack of space; the message names the directory and
  the bytes needed. The previous complete checkpoint is untouched."""


class DownloadError(Error):
  """A released checkpoint that cannot be fetched (offline and not cached, the hub unreachable,
  a file missing there); the message says what to download and where to put it."""

"""The errors of the data stages: a sample that cannot be used, a data file that cannot be read at all."""


class BadSample(ValueError):
    """A sample that is skipped and counted (or fails the run in strict mode).

    Attributes:
      reason: a short stable key for counting, e.g. "missing_image", "corrupt_image", "no_assistant_turn",
        "roles_out_of_order", "empty_text", "image_tokens_truncated", "no_supervised_tokens".
      sample_id: the dataset's id of the sample, when known.
    """

    def __init__(self, reason: str, message: str, sample_id: str | None = None):
        self.reason = reason
        self.sample_id = sample_id
        where = f"sample {sample_id!r}: " if sample_id is not None else ""
        super().__init__(f"{where}{message} [{reason}]")


class DataFileError(ValueError):
    """An annotation file or image archive that cannot be read at all (the message names the file and place)."""

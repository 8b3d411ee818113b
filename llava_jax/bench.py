"""`python -m llava_jax.bench generate ...` (llava_jax.infer.bench) and `python -m llava_jax.bench train ...`
(llava_jax.train.bench)."""

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from llava_jax.train.bench import main as train_main

        return train_main(argv)
    from llava_jax.infer.bench import main as generate_main

    return generate_main(argv)


if __name__ == "__main__":
    sys.exit(main())

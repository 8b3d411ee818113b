import importlib

import llava_jax


def test_every_public_name_resolves_to_its_module_object():
    for name in llava_jax.__all__:
        value = getattr(llava_jax, name)
        assert value is getattr(importlib.import_module(llava_jax._MODULE_OF[name]), name)

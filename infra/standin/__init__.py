"""The lab's stand-in for SGLang (``deepfleet-sglang-standin``) and its container image.

Production never uses anything here: the lab has no GPU and no SGLang image, so its nodes run
this small, clearly named server behind the same systemd unit and ``docker run`` command line.

- :mod:`infra.standin.server`: the stdlib-only HTTP server (``python3 -m sglang.launch_server``
  in the image resolves to it).
- :mod:`infra.standin.image`: builds its container image archive in ``docker save`` format.

See docs/standin.md.
"""

"""Which extra installs which module, so a command whose extra is missing says what to install.

The agent image installs only `edgepack[agent]`; there `edgepack build` fails importing onnx. The root
CLI turns that ImportError into one line naming the extra, instead of "internal error".

`MODULE_EXTRAS` mirrors `[project.optional-dependencies]` in pyproject.toml: the top-level module each
distribution installs, and the extras that pull it in, in pyproject's order. tests/edgepack/test_cli_extras.py
fails when the two disagree. `dev` and `all` are left out: no command needs them.
"""

from __future__ import annotations

from edgepack.errors import MissingExtra, first_line

MODULE_EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("builder",),
    "onnxruntime": ("builder", "agent"),
    "jinja2": ("builder",),  # the report and matrix pages
    "openvino": ("openvino",),
    "nncf": ("openvino",),
    "tensorflow": ("tflite",),  # the tensorflow-cpu distribution
    "tf_keras": ("tflite",),
    "onnx2tf": ("tflite",),
    "onnxsim": ("tflite",),
    "ai_edge_litert": ("tflite", "agent"),
    "sng4onnx": ("tflite",),
    "onnx_graphsurgeon": ("tflite",),
    "psutil": ("tflite",),
    "fastapi": ("fleet",),
    "uvicorn": ("fleet",),
    "sqlalchemy": ("fleet",),
    "alembic": ("fleet",),
    "paho": ("fleet", "agent"),  # the paho-mqtt distribution
    "httpx": ("fleet",),
    "psycopg": ("fleet",),
    "amqtt": ("fleet",),
    "python_multipart": ("fleet",),  # the python-multipart distribution; also installs `multipart`
    "multipart": ("fleet",),
    "prometheus_client": ("fleet",),
    "boto3": ("s3",),  # `fleet serve --bundle-store s3://…`
    "docker": ("toolchain",),
}


def missing_extra(exc: ImportError, command: str, command_extras: tuple[str, ...]) -> MissingExtra | None:
    """The one-line error for an ImportError of an extra's module, or None when no extra provides it (a bug).

    When one of the command's own extras provides the module, the line names all of them (one install
    gets the command running: a testbed needs builder, fleet and agent), so a module several extras
    provide (onnxruntime) reads builder for `edgepack build` and agent for `edgepack agent run`.
    Otherwise the module comes from another extra (openvino for an OpenVINO profile) and the line names that.
    """
    module = (exc.name or "").split(".")[0]
    providers = MODULE_EXTRAS.get(module)
    if not providers:
        return None
    wanted = command_extras if set(command_extras) & set(providers) else providers[:1]
    noun = f"the {wanted[0]} extra" if len(wanted) == 1 else f"the {', '.join(wanted[:-1])} and {wanted[-1]} extras"
    cause = f"missing module: {module}" if isinstance(exc, ModuleNotFoundError) else f"cannot import {module}: {first_line(exc)}"
    return MissingExtra(f"'{command}' needs {noun}: pip install 'edgepack[{','.join(wanted)}]' ({cause})",
                        command=command, extras=wanted, module=module)



# Kernel settings of soupkit's venv: `make setup` copies this file to .venv/etc/ipython/ (IPython reads config
# from <sys.prefix>/etc/ipython), so it applies to this venv's kernels only: JupyterLab, papermill and nbval.
import logging


class _NoTcpEncryptionWarning(logging.Filter):
    """Drop ipykernel's start-up warning that the kernel talks to its local front end over TCP without CurveZMQ.

    Every kernel on 127.0.0.1 prints it on every run, which buries the lines a user needs; every other message
    of the kernel's log passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "running over TCP without encryption" not in record.getMessage()


logging.getLogger("IPKernelApp").addFilter(_NoTcpEncryptionWarning())

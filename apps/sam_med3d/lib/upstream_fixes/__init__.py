"""Where the app corrects MONAI Label 0.8.5: one module per upstream defect, installed by :func:`install`.

Each module's docstring says what MONAI Label does, why the app changes it, and what would let us delete the
module; each has a test that fails without it. In the order :func:`install` puts them in place:

- :mod:`lib.trainers.preflight`: a train request with nothing to train on, bad options or ``run_sync`` is
  refused (409/422) before a subprocess starts (``tests/test_app_server.py``, ``tests/test_reliability.py``);
- :mod:`.task_routes`: the infer, train, scoring and active-learning routes run off the event loop, an infer
  request is checked once (``tests/test_reliability.py``, ``tests/test_request_guard.py``);
- :mod:`.task_shutdown`: task subprocesses stop with the server, on SIGTERM or SIGKILL
  (``tests/test_reliability.py``); :func:`on_app_created` arms the SIGKILL half in each task subprocess;
- :mod:`.cors_policy`: no cross-origin answers by default (``tests/test_serve_script.py``);
- :mod:`.token_algorithms`: RS256 tokens accepted (``tests/test_auth.py``);
- :mod:`.login_route`: a wrong password is 401 (``tests/test_auth.py``);
- :mod:`.auth_everywhere`: every request needs a valid token when auth is on, before the request guard
  (``tests/test_auth.py``);
- :mod:`.request_guard`: hostile names, uploads and task fields refused before MONAI Label's endpoints
  (``tests/test_request_guard.py``);
- :mod:`.reload_route`: ``POST /reload`` refused (``tests/test_auth.py``);
- :mod:`.checksum_route`, :mod:`.gpu_log_route`, :mod:`.proxy_route`, :mod:`.session_image_route`: routes that
  answered 500 (``tests/test_no_server_errors.py``);
- :mod:`.session_upload_route`: ``PUT /session/`` read through the app's reader, a single-file DICOM volume
  accepted, nothing left in the temporary folder (``tests/test_file_safety.py``).

Not installed here: :mod:`.datastore_index` (the datastore index written atomically, rebuilt when unreadable,
``info`` bounded) is a base class of the app's datastores (``tests/test_datastore_index.py``).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def on_app_created() -> None:
    """Call first in the app's constructor: in a task subprocess (training, scoring), exit when the server dies
    (``kill -9``, a crash), which MONAI Label does not arrange."""
    from lib.upstream_fixes.task_shutdown import exit_with_parent, is_task_subprocess

    if is_task_subprocess():
        exit_with_parent()


def install(app: Any) -> None:
    """Put every fix in place, in the server process, from ``MONAILabelApp.on_init_complete`` (``app``: the
    :class:`main.SamMed3DApp`). The order matters where noted."""
    from lib.trainers.preflight import install_train_preflight
    from lib.upstream_fixes.auth_everywhere import install_require_token
    from lib.upstream_fixes.checksum_route import install_checksum_route
    from lib.upstream_fixes.cors_policy import install_cors_policy
    from lib.upstream_fixes.gpu_log_route import install_gpu_log_route
    from lib.upstream_fixes.login_route import install_login_route
    from lib.upstream_fixes.proxy_route import install_proxy_refusal
    from lib.upstream_fixes.reload_route import install_reload_refusal
    from lib.upstream_fixes.request_guard import install_request_guard
    from lib.upstream_fixes.session_image_route import install_session_image_route
    from lib.upstream_fixes.session_upload_route import install_session_upload_route
    from lib.upstream_fixes.task_routes import install_task_routes
    from lib.upstream_fixes.task_shutdown import install_clean_shutdown
    from lib.upstream_fixes.token_algorithms import install_token_algorithms

    options = app.config.options
    install_train_preflight(app)
    install_task_routes()
    install_clean_shutdown([options.model_dir])  # after uvicorn installed its signal handlers
    install_cors_policy(options.cors_origins)
    # Token checks first: with MONAI_LABEL_AUTH_ENABLE every request without a valid token is 401 before
    # anything else runs, the request guard included.
    install_token_algorithms()
    install_login_route()
    install_require_token()
    install_request_guard()
    install_reload_refusal()
    install_checksum_route()
    install_gpu_log_route()
    install_proxy_refusal(app.studies)
    install_session_image_route()
    install_session_upload_route(options.max_voxels)
    logger.info("MONAI Label 0.8.5 fixes installed (lib/upstream_fixes)")

"""Where the app corrects MONAI Label 0.8.5: one module per upstream defect.

Each module's docstring says what MONAI Label does, why the app changes it, and what would let us delete the
module; each has a test that fails without it. ``main.py`` (``SamMed3DApp.on_init_complete``) installs them.

In this package:

- :mod:`.datastore_index`: the datastore index written atomically, rebuilt when unreadable, ``info`` bounded
  (a mixin of the app's datastores; ``tests/test_datastore_index.py``);
- :mod:`.token_algorithms`: RS256 tokens accepted (``tests/test_auth.py``);
- :mod:`.auth_everywhere`: every request needs a valid token when auth is on, before the request guard
  (``tests/test_auth.py``);
- :mod:`.login_route`: a wrong password is 401 (``tests/test_auth.py``);
- :mod:`.reload_route`: ``POST /reload`` refused (``tests/test_auth.py``);
- :mod:`.checksum_route`, :mod:`.gpu_log_route`, :mod:`.proxy_route`, :mod:`.session_image_route`: routes that
  answered 500 (``tests/test_no_server_errors.py``);
- :mod:`.session_upload_route`: ``PUT /session/`` read through the app's reader, a single-file DICOM volume
  accepted, nothing left in the temporary folder (``tests/test_file_safety.py``);
- :mod:`.cors_policy`: no cross-origin answers by default (``tests/test_serve_script.py``);
- :mod:`.task_shutdown`: task subprocesses stop with the server, SIGTERM or SIGKILL
  (``tests/test_reliability.py``).

Fixes of MONAI Label that live elsewhere for now: :mod:`lib.request_guard` (hostile request fields),
:mod:`lib.routes` (task routes off the event loop), :mod:`lib.trainers.preflight` (training requests checked
before a subprocess starts).
"""

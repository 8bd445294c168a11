"""Every state-changing operation of the fleet, as a named command: ``(ctx, ...inputs) -> CommandResult``.

Callers (the REST API, the dashboard, offline media) never write to the database themselves; they run a
command on the service's single worker with ``FleetService.execute(command, *inputs, actor=...)``::

    result = svc.execute(commands.apply_deployment, manifest, actor="admin")
    result.value            # the command's typed value (here an ApplyResult)
    result.changed_devices  # devices whose desired state it changed (published after the commit)

To add one: write it in the module of its resource, export it here, and call it through ``execute``.
"""

from .base import CommandContext, CommandResult
from .deployments import apply_deployment, control_deployment, delete_deployment
from .devices import create_enrollment_token, delete_device, enroll, rotate_credentials, update_device
from .models import UploadedModel, delete_model, discard_blobs, stage_upload, upload_model
from .offline import PackageOptions, import_telemetry_file, prepare_package
from .releases import create_release

__all__ = [
    "CommandContext",
    "CommandResult",
    "PackageOptions",
    "UploadedModel",
    "apply_deployment",
    "control_deployment",
    "create_enrollment_token",
    "create_release",
    "delete_deployment",
    "delete_device",
    "delete_model",
    "enroll",
    "import_telemetry_file",
    "prepare_package",
    "rotate_credentials",
    "discard_blobs",
    "stage_upload",
    "update_device",
    "upload_model",
]

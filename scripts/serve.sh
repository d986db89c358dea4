#!/usr/bin/env bash
# Run the SAM-Med3D annotation server: set up .venv/, make sample studies if there are none, and start
# MONAI Label with the SAM-Med3D app (default model: SAM-Med3D-turbo, downloaded into apps/sam_med3d/model/
# on the first start; the bundled offline model when that download fails).
#
#   bash scripts/serve.sh                                   # studies/ (made if empty), 127.0.0.1:8000
#   HOST=0.0.0.0 bash scripts/serve.sh                      # reachable from other machines (read docs/app.md
#                                                           # "Exposing the server" first: no auth by default)
#   STUDIES=/data/ct PORT=8001 bash scripts/serve.sh        # your own folder of NIfTI/NRRD scans
#   STUDIES=http://127.0.0.1:8042/dicom-web bash scripts/serve.sh   # a DICOMweb server (needed for OHIF)
#   bash scripts/serve.sh --conf labels spleen=1,liver=2 --conf checkpoint /path/to/sam_med3d_turbo.pth
#
# Extra arguments go to `monailabel start_server` (see docs/app.md for every --conf option). MONAI Label's
# launcher re-splits its arguments on spaces: paths and --conf values must not contain spaces.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate

STUDIES=${STUDIES:-studies}
# Loopback only unless the user asks for more: the API has no authentication by default.
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}

if [[ ! "$STUDIES" =~ ^https?:// ]] && [ -z "$(ls -A "$STUDIES" 2>/dev/null || true)" ]; then
  if [ -f sample-datasets/make_samples.py ]; then
    echo "No studies in $STUDIES/: writing synthetic CT phantoms (2 labelled, 4 to annotate; about a minute)..."
    python sample-datasets/make_samples.py --output "$STUDIES" --num-cases 6 --unlabeled 4
  elif [ -d ../shared/data ]; then
    echo "No studies in $STUDIES/: copying the development scans from ../shared/data (images only)..."
    mkdir -p "$STUDIES"
    for image in ../shared/data/*/imagesTr/*.nii.gz; do
      dataset=$(basename "$(dirname "$(dirname "$image")")")
      cp "$image" "$STUDIES/${dataset}__$(basename "$image")"
    done
  else
    echo "No studies in $STUDIES/ and no way to make samples: set STUDIES=<folder of scans or DICOMweb URL>" >&2
    exit 1
  fi
fi

shown_host=$HOST
if [ "$HOST" = "0.0.0.0" ]; then
  shown_host=$(hostname -I 2>/dev/null | awk '{print $1}')
  shown_host=${shown_host:-127.0.0.1}
fi
cat <<EOF

  SAM-Med3D annotation server: http://${shown_host}:${PORT}   (API docs: http://${shown_host}:${PORT}/docs)
  Studies: ${STUDIES}

  3D Slicer: install the "MONAI Label" extension (View > Extensions Manager), open the MONAI Label module,
    enter http://${shown_host}:${PORT} as server and press refresh; "Next Sample" loads a scan. Pick a label,
    place foreground points on the structure ("background" label for background points): each click
    returns the 3D mask. "Submit Label" saves it, "Train" fine-tunes the model on the saved labels.
  OHIF (built in): http://${shown_host}:${PORT}/ohif/ -- needs DICOM: start with
    STUDIES=<DICOMweb URL, e.g. http://127.0.0.1:8042/dicom-web> and use the MONAI Label panel's
    "Point Prompts" (model sam_med3d).

  Starting (loading the model can take a minute; the server answers when "Application startup complete")...

EOF

exec monailabel start_server --app apps/sam_med3d --studies "$STUDIES" --host "$HOST" --port "$PORT" "$@"

"""``heatmark predict BUNDLE INPUT OUTPUT``: run a trained bundle over many images, resumably.

The model of a MONAI bundle (``models/model.pt``, the network's ``state_dict``, or ``--model``) is
loaded once and run over every input image with the bundle's own ``inference#preprocessing`` (the
training preprocessing without landmarks, so training and prediction cannot drift apart),
``inference#inferer`` (``SimpleInferer`` unless the bundle says otherwise) and
``inference#postprocessing`` (:class:`heatmark.evaluation.DecodeLandmarksd`: heatmaps -> world mm).

The flow, one module per step::

    inputs.py    find_inputs, assign_case_names,    INPUT -> image paths -> case names -> the names
                 case_file_name                     of their files (one function)
    model.py     load_bundle -> LoadedBundle        configs of the bundle's `inference` workflow
                                                    (heatmark.bundle), network + weights, device, amp,
                                                    fingerprint, plausibility limits
    checks.py    ImageChecks, refuse_outside        implausible images; landmarks outside the image
    store.py     CaseStore, check_run_file,         OUTPUT/.heatmark: what is done, what failed;
                 check_inside                       refuses results of another model or settings,
                                                    and symbolic links in OUTPUT
    dataset.py   CaseDataset, collate               preprocessing in DataLoader workers: a case or
                                                    an error record, never an exception
    runner.py    run_predict, infer_group           inferer + decoding per batch, the loop, Ctrl-C
    distributed.py  ranks_from_env, Ranks, shard    torchrun: which cases this process takes
    backends.py  OnnxRuntimeNetwork,                --backend onnxruntime: the network call on the
                 load_onnx_network                  exported models/model.onnx (heatmark export), CPU
    export.py    write_case, write_tables           per-case files, then the tables from the states
    cli.py       add_predict_parser, cmd_predict,   the command line; run_inference for
                 main, run_inference                `python -m monai.bundle run inference`
    options.py   PredictOptions, PredictSummary     what a run takes and gives (exit status)
    errors.py    PredictUsageError,                 usage errors; OUTPUT write failures; one-line
                 PredictOutputError, describe       reasons for errors.csv

INPUT is an image file, a folder (scanned for the endings of :data:`IMAGE_SUFFIXES` and DICOM
files; with a 3D bundle a folder of DICOM slices is one series; ``--recursive`` descends into
subfolders, ``--pattern GLOB`` chooses files by name), or a ``.txt``/``.lst`` file listing one path
per line (relative to the list's folder; blank lines and ``#`` comments are skipped).

Layout of OUTPUT::

    landmarks.csv          case,landmark,name,frame,x_mm,y_mm[,z_mm],confidence (frame: RAS,
                           mm), every case done, sorted by case; a plain CSV (pandas.read_csv)
    measurements.csv       case,<measurement names...> when the bundle defines `measurements`
    errors.csv             case,path,error: every input that could not be processed (header only
                           when none failed), implausible images included (see below)
    warnings.csv           case,path,warning: per case done, each landmark set missing because it
                           was predicted outside the image (header only when none)
    <case>.mrk.json        per case, 3D Slicer markups (LPS, as Slicer writes them; each point's
                           description is confidence=<value>); and/or
    <case>.fcsv / .json    per --format (fcsv in RAS; heatmark's plain JSON in RAS)
    <case>_heatmaps.nii.gz with --save-heatmaps: the network output, landmarks along the 4th axis
                           (2D: X x Y x 1 x N), with the output grid's affine
    <case>_overlay.png     with --overlays: the landmarks on the original image, axes in mm
    .heatmark/run.json     what produced the folder (model and config hashes, options)
    .heatmark/cases/<case>.json   per-case state: the landmarks, confidence, measurements and
                           files of a case done, or the error of a case that failed

Case names and file names: a case is named after its input file without the image ending, made
safe (letters, digits, ``_``, ``-``; a dot becomes ``_``: ``a.mrk.nii.gz`` is case ``a_mrk``) and
unique. Every file of a case is named by one function, ``case_file_name``: the case name plus
``.mrk.json``, ``.fcsv``, ``.json``, ``_heatmaps.nii.gz`` or ``_overlay.png``. As case names hold no
dot, the text after the first dot of a file name says its kind and the text before it its case: two
cases can never name one file (checked once more over all cases and formats before any write), and
a case's old files are deleted by their exact names, never by prefix. (States of cases whose name
holds a dot, from before this rule, are ignored and those inputs redone.)

Plausibility (:mod:`heatmark.predict.checks`, limits in the bundle's config, defaults in
``base.yaml``): an image as loaded with fewer than ``predict_min_voxels`` (8) voxels along an axis,
an extent below ``predict_min_extent_mm`` along an axis (default 1/8 of the network input's field of
view ``input_size x spacing_mm``, ``predict_min_extent_fraction``), or fewer than
``predict_min_distinct_values`` (16) distinct intensity values is refused: its row in errors.csv
names the reason and the key. A landmark predicted more than ``predict_max_outside_mm`` outside the
image's field of view (default: 1/8 of the shortest axis of the network's field of view, 24 mm for
192 x 240 mm) is not answered: it is missing (NaN, empty cells, as a landmark
not found) in every output of the case, and listed in warnings.csv and on stderr; the case counts
as done (landmarks.csv keeps its format).

Safety of OUTPUT: OUTPUT is resolved once; ``.heatmark``, ``.heatmark/cases``, ``run.json``, the
tables, the state files and the case files the run will write must not be symbolic links (a usage
error, exit status 2, before anything is written or deleted), and deleting never follows a link
(temporary debris is removed from OUTPUT and ``.heatmark`` themselves only). ``--recursive`` does not
descend into OUTPUT nor into any folder holding a ``.heatmark`` state folder (an earlier OUTPUT).
DataLoader workers end with their parent, also when it is killed (Linux: ``PR_SET_PDEATHSIG``).

Write failures: any ``OSError`` writing OUTPUT (disk full, read-only folder, no permission) stops
the run with one line naming the file, the system's reason and "rerun ... to resume", exit status
1 (``--debug`` adds the traceback); the files already written stay intact, and a rerun with space
gives the same files as an uninterrupted run. An ``OSError`` reading an input is that case's error.

Resuming: every file is written to a temporary name and renamed (:mod:`heatmark.core.fileio`). A case's
own files are written as soon as it is done, then its state file, which is the commit mark. The
aggregate tables are regenerated from the states after each batch (at most once a second) and at
the end, also after Ctrl-C, so they are always complete files that agree with the states. A rerun
into the same OUTPUT skips the cases whose state says done for the same input path with all the
requested files present (``--overwrite`` redoes them); failed cases are retried. A folder written
with another model, other configs or another ``--spacing`` is refused unless ``--overwrite``.
Rows are sorted by case, numbers written at full precision, and every forward pass runs at the full
``--batch-size`` (partial batches are padded), so an interrupted and resumed run gives the same
``landmarks.csv`` as an uninterrupted one with the same options, byte for byte.

Several processes: under ``torchrun --nproc_per_node N -m heatmark predict ...``
(:mod:`heatmark.predict.distributed`) rank 0 prepares OUTPUT (debris, run.json, results of another
run), the cases still to do are dealt round-robin over the ranks, each rank writes only its cases'
files and states, and after a barrier rank 0 rebuilds the tables from all the states (tables are not
rewritten during such a run). A killed run resumes from the states, with any number of processes;
the merged files equal a single-process run's with the same threads per process.

MONAI: ``python -m monai.bundle run inference ... --input_dir IN --output_dir OUT`` builds the
``inference`` section of the shipped ``inference.yaml``, whose ``run`` entry calls
:func:`run_inference` with the config's ``predict_options``: the same run as ``heatmark predict``.

Exit status: 0 all inputs done (or skipped as done before), 1 some failed (see errors.csv) or
OUTPUT could not be written, 2 usage errors (missing bundle or model, no inputs, bad option, symbolic
links in OUTPUT), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

from heatmark.predict.checks import ImageChecks
from heatmark.predict.cli import add_predict_parser, cmd_predict, main, predict_and_report, run_inference
from heatmark.predict.errors import PredictOutputError, PredictUsageError
from heatmark.predict.inputs import (
    CASE_FILE_KINDS,
    IMAGE_SUFFIXES,
    LIST_SUFFIXES,
    assign_case_names,
    case_file_name,
    case_file_names,
    find_inputs,
    parse_case_file_name,
)
from heatmark.predict.model import LoadedBundle, load_bundle
from heatmark.predict.options import (
    DEFAULT_FORMATS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    FORMATS,
    PredictOptions,
    PredictSummary,
)
from heatmark.predict.runner import AGGREGATE_INTERVAL_S, run_predict
from heatmark.predict.store import STATE_DIR, STATE_VERSION
from heatmark.predict.api import LandmarkModel, Prediction, load_model
from heatmark.transforms.io import has_dicom_marker  # noqa: F401 - was heatmark.predict.has_dicom_marker

__all__ = [
    "PredictUsageError",
    "PredictOutputError",
    "ImageChecks",
    "CASE_FILE_KINDS",
    "case_file_name",
    "case_file_names",
    "parse_case_file_name",
    "PredictOptions",
    "PredictSummary",
    "add_predict_parser",
    "cmd_predict",
    "main",
    "predict_and_report",
    "run_inference",
    "run_predict",
    "find_inputs",
    "assign_case_names",
    "load_bundle",
    "load_model",
    "LandmarkModel",
    "Prediction",
    "LoadedBundle",
    "FORMATS",
    "DEFAULT_FORMATS",
    "IMAGE_SUFFIXES",
    "LIST_SUFFIXES",
    "STATE_DIR",
    "STATE_VERSION",
    "AGGREGATE_INTERVAL_S",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
]

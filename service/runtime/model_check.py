"""Push gate 4, where TensorFlow lives: denied ops, then the serving runtime's own load checks.

`check_model` loads the model in this process, so it runs in the inference process (which
already holds TensorFlow); the entry side reaches it through the inference service.
"""

import tempfile
from pathlib import Path

from service.errors import RejectedModel
from service.runtime.loaded_model import LoadedModel
from service.store.layout import SAVED_MODEL_FILE
from service.store.repository import ModelRepository

# Ops that touch the file system, the network or the Python interpreter. A graft export needs
# none of them in its serving functions (SaveV2/RestoreV2 stay: every SavedModel's checkpoint
# functions use them). Defence in depth only: the admin token is the real boundary.
DENIED_OPS = frozenset(
    {
        "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst",
        "PyFunc", "PyFuncStateless", "EagerPyFunc",
        "Print", "PrintV2", "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3",
        "DebugNanCount", "DebugNumericSummary", "DebugNumericSummaryV2",
        "Save", "SaveSlices", "Restore", "RestoreSlice",
        "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary", "WriteRawProtoSummary",
        "WriteScalarSummary", "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary",
        "WriteGraphSummary", "ImportEvent",
        "TFRecordDataset", "TFRecordDatasetV2", "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2", "TextLineDataset", "SqlDataset", "ExperimentalSqlDataset",
        "LMDBDataset", "ExperimentalLMDBDataset", "SaveDataset", "SaveDatasetV2", "LoadDataset",
        "SnapshotDataset", "SnapshotDatasetV2", "DatasetToTFRecord",
        "ExperimentalDatasetToTFRecord",
        "TFRecordReader", "TFRecordReaderV2", "TextLineReader", "TextLineReaderV2",
        "WholeFileReader", "WholeFileReaderV2", "FixedLengthRecordReader",
        "FixedLengthRecordReaderV2", "LMDBReader", "RecordInput",
        "RegisterDataset", "DataServiceDataset", "DataServiceDatasetV2",
        "DataServiceDatasetV3", "DataServiceDatasetV4",
        "_Send", "_Recv", "_HostSend", "_HostRecv",
    }
)  # fmt: skip


def check_model(folder: Path, name: str) -> None:
    """The TensorFlow gate: denied ops, then the serving runtime's own load + warm-up checks.

    Loads the model in this process: run it where TensorFlow already lives.
    """
    refuse_denied_ops(folder / SAVED_MODEL_FILE)

    # Beside the export, i.e. inside a push's scratch folder: what a killed check leaves goes too.
    with tempfile.TemporaryDirectory(prefix=".check-", dir=folder.parent) as scratch:
        trial = ModelRepository(scratch)
        version = trial.publish(folder, name)
        LoadedModel.load(trial, name, version)


def refuse_denied_ops(saved_model_pb: Path) -> None:
    """Refuse a SavedModel whose graph or function library uses any op in DENIED_OPS."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(saved_model_pb.read_bytes())
    except Exception as error:  # protobuf's DecodeError has no stable import path
        raise RejectedModel(f"saved_model.pb is not a SavedModel protobuf ({error})") from None
    used = {
        node.op
        for graph in proto.meta_graphs
        for nodes in (
            graph.graph_def.node,
            *(function.node_def for function in graph.graph_def.library.function),
        )
        for node in nodes
    }
    denied = sorted(used & DENIED_OPS)
    if denied:
        raise RejectedModel(
            f"the graph uses ops graft does not serve: {', '.join(denied)} (they reach the file "
            "system, network or Python); export with training.export.export_model"
        )

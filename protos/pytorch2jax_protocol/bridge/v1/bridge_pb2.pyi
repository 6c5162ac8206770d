from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    COMPLEX64: _ClassVar[DType]
    COMPLEX128: _ClassVar[DType]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    INLINE: _ClassVar[Transport]
    SHM: _ClassVar[Transport]
    CUDA_IPC: _ClassVar[Transport]
DTYPE_UNSPECIFIED: DType
BOOL: DType
UINT8: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType
FLOAT64: DType
COMPLEX64: DType
COMPLEX128: DType
TRANSPORT_UNSPECIFIED: Transport
INLINE: Transport
SHM: Transport
CUDA_IPC: Transport

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "inline_data", "shm", "cuda_ipc")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    inline_data: bytes
    shm: SharedMemoryRef
    cuda_ipc: SharedMemoryRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., inline_data: _Optional[bytes] = ..., shm: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., cuda_ipc: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region", "offset", "nbytes")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    region: int
    offset: int
    nbytes: int
    def __init__(self, region: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "spec", "tuple", "list", "dict", "none", "bool_value", "int_value", "float_value", "string_value")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TUPLE_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    DICT_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    spec: TensorSpec
    tuple: Sequence
    list: Sequence
    dict: Mapping
    none: bool
    bool_value: bool
    int_value: int
    float_value: float
    string_value: str
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., spec: _Optional[_Union[TensorSpec, _Mapping]] = ..., tuple: _Optional[_Union[Sequence, _Mapping]] = ..., list: _Optional[_Union[Sequence, _Mapping]] = ..., dict: _Optional[_Union[Mapping, _Mapping]] = ..., none: _Optional[bool] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ...) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Mapping(_message.Message):
    __slots__ = ("keys", "values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Arguments(_message.Message):
    __slots__ = ("args", "kwargs")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedCompositeFieldContainer[Value]
    kwargs: Mapping
    def __init__(self, args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., kwargs: _Optional[_Union[Mapping, _Mapping]] = ...) -> None: ...

class Program(_message.Message):
    __slots__ = ("transforms",)
    TRANSFORMS_FIELD_NUMBER: _ClassVar[int]
    transforms: _containers.RepeatedCompositeFieldContainer[Transform]
    def __init__(self, transforms: _Optional[_Iterable[_Union[Transform, _Mapping]]] = ...) -> None: ...

class Transform(_message.Message):
    __slots__ = ("jvp", "vjp", "vmap")
    JVP_FIELD_NUMBER: _ClassVar[int]
    VJP_FIELD_NUMBER: _ClassVar[int]
    VMAP_FIELD_NUMBER: _ClassVar[int]
    jvp: Jvp
    vjp: Vjp
    vmap: Vmap
    def __init__(self, jvp: _Optional[_Union[Jvp, _Mapping]] = ..., vjp: _Optional[_Union[Vjp, _Mapping]] = ..., vmap: _Optional[_Union[Vmap, _Mapping]] = ...) -> None: ...

class Jvp(_message.Message):
    __slots__ = ("wrt", "outputs")
    WRT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    wrt: _containers.RepeatedScalarFieldContainer[int]
    outputs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, wrt: _Optional[_Iterable[int]] = ..., outputs: _Optional[_Iterable[int]] = ...) -> None: ...

class Vjp(_message.Message):
    __slots__ = ("wrt", "outputs")
    WRT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    wrt: _containers.RepeatedScalarFieldContainer[int]
    outputs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, wrt: _Optional[_Iterable[int]] = ..., outputs: _Optional[_Iterable[int]] = ...) -> None: ...

class Vmap(_message.Message):
    __slots__ = ("in_dims", "axis_size", "method")
    class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        AUTO: _ClassVar[Vmap.Method]
        BATCHED: _ClassVar[Vmap.Method]
        SEQUENTIAL: _ClassVar[Vmap.Method]
    AUTO: Vmap.Method
    BATCHED: Vmap.Method
    SEQUENTIAL: Vmap.Method
    IN_DIMS_FIELD_NUMBER: _ClassVar[int]
    AXIS_SIZE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    in_dims: _containers.RepeatedScalarFieldContainer[int]
    axis_size: int
    method: Vmap.Method
    def __init__(self, in_dims: _Optional[_Iterable[int]] = ..., axis_size: _Optional[int] = ..., method: _Optional[_Union[Vmap.Method, str]] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class NamedSpec(_message.Message):
    __slots__ = ("name", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: TensorSpec
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[TensorSpec, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("transports", "fast_lane", "pid")
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    FAST_LANE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    transports: _containers.RepeatedScalarFieldContainer[Transport]
    fast_lane: bool
    pid: int
    def __init__(self, transports: _Optional[_Iterable[_Union[Transport, str]]] = ..., fast_lane: _Optional[bool] = ..., pid: _Optional[int] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session", "transports", "server_version", "refused", "fast_lane")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    FAST_LANE_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    transports: _containers.RepeatedScalarFieldContainer[Transport]
    server_version: str
    refused: str
    fast_lane: FastLane
    def __init__(self, session: _Optional[bytes] = ..., transports: _Optional[_Iterable[_Union[Transport, str]]] = ..., server_version: _Optional[str] = ..., refused: _Optional[str] = ..., fast_lane: _Optional[_Union[FastLane, _Mapping]] = ...) -> None: ...

class FastLane(_message.Message):
    __slots__ = ("address", "capability")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    address: str
    capability: bytes
    def __init__(self, address: _Optional[str] = ..., capability: _Optional[bytes] = ...) -> None: ...

class RegisterRegionRequest(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class RegisterRegionResponse(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: int
    def __init__(self, region: _Optional[int] = ...) -> None: ...

class CreateCudaPoolRequest(_message.Message):
    __slots__ = ("device_uuid", "size")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    device_uuid: bytes
    size: int
    def __init__(self, device_uuid: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class CreateCudaPoolResponse(_message.Message):
    __slots__ = ("region", "ipc_handle")
    REGION_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    region: int
    ipc_handle: bytes
    def __init__(self, region: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "server_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    server_version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., server_version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "parameters", "buffers", "signature", "doc")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ModelInfo.Kind]
        MODULE: _ClassVar[ModelInfo.Kind]
        FUNCTION: _ClassVar[ModelInfo.Kind]
    KIND_UNSPECIFIED: ModelInfo.Kind
    MODULE: ModelInfo.Kind
    FUNCTION: ModelInfo.Kind
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ModelInfo.Kind
    parameters: _containers.RepeatedCompositeFieldContainer[NamedSpec]
    buffers: _containers.RepeatedCompositeFieldContainer[NamedSpec]
    signature: str
    doc: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ModelInfo.Kind, str]] = ..., parameters: _Optional[_Iterable[_Union[NamedSpec, _Mapping]]] = ..., buffers: _Optional[_Iterable[_Union[NamedSpec, _Mapping]]] = ..., signature: _Optional[str] = ..., doc: _Optional[str] = ...) -> None: ...

class GetParametersRequest(_message.Message):
    __slots__ = ("model", "include_buffers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    include_buffers: bool
    def __init__(self, model: _Optional[str] = ..., include_buffers: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "data", "is_buffer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    IS_BUFFER_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    is_buffer: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., is_buffer: _Optional[bool] = ...) -> None: ...

class InferShapesRequest(_message.Message):
    __slots__ = ("model", "arguments", "int32_as_int64", "train")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    INT32_AS_INT64_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    model: str
    arguments: Arguments
    int32_as_int64: bool
    train: bool
    def __init__(self, model: _Optional[str] = ..., arguments: _Optional[_Union[Arguments, _Mapping]] = ..., int32_as_int64: _Optional[bool] = ..., train: _Optional[bool] = ...) -> None: ...

class InferShapesResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: Value
    def __init__(self, outputs: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model", "arguments", "parameters", "keep_residual", "reply_area", "program", "program_inputs", "residual_wrt", "release_residuals", "int32_as_int64", "rng", "train", "returned_buffers", "prepare")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    KEEP_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    REPLY_AREA_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_WRT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    INT32_AS_INT64_FIELD_NUMBER: _ClassVar[int]
    RNG_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    RETURNED_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    model: str
    arguments: Arguments
    parameters: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    keep_residual: bool
    reply_area: SharedMemoryRef
    program: Program
    program_inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    residual_wrt: _containers.RepeatedScalarFieldContainer[int]
    release_residuals: _containers.RepeatedScalarFieldContainer[bytes]
    int32_as_int64: bool
    rng: Tensor
    train: bool
    returned_buffers: _containers.RepeatedScalarFieldContainer[str]
    prepare: bool
    def __init__(self, model: _Optional[str] = ..., arguments: _Optional[_Union[Arguments, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., keep_residual: _Optional[bool] = ..., reply_area: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., program: _Optional[_Union[Program, _Mapping]] = ..., program_inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., residual_wrt: _Optional[_Iterable[int]] = ..., release_residuals: _Optional[_Iterable[bytes]] = ..., int32_as_int64: _Optional[bool] = ..., rng: _Optional[_Union[Tensor, _Mapping]] = ..., train: _Optional[bool] = ..., returned_buffers: _Optional[_Iterable[str]] = ..., prepare: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("outputs", "residual", "vmap_fallbacks", "prepared")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    VMAP_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    outputs: Value
    residual: bytes
    vmap_fallbacks: _containers.RepeatedCompositeFieldContainer[VmapFallback]
    prepared: int
    def __init__(self, outputs: _Optional[_Union[Value, _Mapping]] = ..., residual: _Optional[bytes] = ..., vmap_fallbacks: _Optional[_Iterable[_Union[VmapFallback, _Mapping]]] = ..., prepared: _Optional[int] = ...) -> None: ...

class VmapFallback(_message.Message):
    __slots__ = ("transform", "reason")
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    transform: int
    reason: str
    def __init__(self, transform: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class VjpRequest(_message.Message):
    __slots__ = ("model", "residual", "arguments", "parameters", "cotangents", "retain_residual", "reply_area", "wrt", "cotangent_outputs", "prepare")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    REPLY_AREA_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    COTANGENT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    model: str
    residual: bytes
    arguments: Arguments
    parameters: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    cotangents: _containers.RepeatedCompositeFieldContainer[Tensor]
    retain_residual: bool
    reply_area: SharedMemoryRef
    wrt: _containers.RepeatedScalarFieldContainer[int]
    cotangent_outputs: _containers.RepeatedScalarFieldContainer[int]
    prepare: bool
    def __init__(self, model: _Optional[str] = ..., residual: _Optional[bytes] = ..., arguments: _Optional[_Union[Arguments, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., cotangents: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., retain_residual: _Optional[bool] = ..., reply_area: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., wrt: _Optional[_Iterable[int]] = ..., cotangent_outputs: _Optional[_Iterable[int]] = ..., prepare: _Optional[bool] = ...) -> None: ...

class VjpResponse(_message.Message):
    __slots__ = ("argument_grads", "parameter_grads", "grads", "prepared")
    ARGUMENT_GRADS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_GRADS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    argument_grads: _containers.RepeatedCompositeFieldContainer[Tensor]
    parameter_grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    grads: _containers.RepeatedCompositeFieldContainer[Tensor]
    prepared: int
    def __init__(self, argument_grads: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., parameter_grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., grads: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., prepared: _Optional[int] = ...) -> None: ...

class ReleaseResidualsRequest(_message.Message):
    __slots__ = ("residuals",)
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    residuals: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, residuals: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleaseResidualsResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class WorkerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("calls_in_flight", "calls_served", "calls_cancelled", "sessions", "regions", "region_bytes", "residuals", "residual_bytes", "resident_bytes", "calls_refused", "lane_connections", "lane_calls", "prepared_calls")
    CALLS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CALLS_SERVED_FIELD_NUMBER: _ClassVar[int]
    CALLS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    REGION_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CALLS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    LANE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    LANE_CALLS_FIELD_NUMBER: _ClassVar[int]
    PREPARED_CALLS_FIELD_NUMBER: _ClassVar[int]
    calls_in_flight: int
    calls_served: int
    calls_cancelled: int
    sessions: int
    regions: int
    region_bytes: int
    residuals: int
    residual_bytes: int
    resident_bytes: int
    calls_refused: int
    lane_connections: int
    lane_calls: int
    prepared_calls: int
    def __init__(self, calls_in_flight: _Optional[int] = ..., calls_served: _Optional[int] = ..., calls_cancelled: _Optional[int] = ..., sessions: _Optional[int] = ..., regions: _Optional[int] = ..., region_bytes: _Optional[int] = ..., residuals: _Optional[int] = ..., residual_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., calls_refused: _Optional[int] = ..., lane_connections: _Optional[int] = ..., lane_calls: _Optional[int] = ..., prepared_calls: _Optional[int] = ...) -> None: ...

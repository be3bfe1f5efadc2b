//! The RPCs of the protocol neither server supports (shared memory, trace and log
//! settings), answered UNIMPLEMENTED with what is missing, in one place for both.

/// Expands, inside a `#[tonic::async_trait] impl GrpcInferenceService`, to the methods
/// infermesh does not support. They are written in the form `async_trait` gives the trait's
/// methods, because an attribute macro does not see inside a macro call in its impl.
#[macro_export]
macro_rules! unsupported_rpcs {
    () => {
        $crate::unsupported_rpcs! {
            system_shared_memory_status(SystemSharedMemoryStatusRequest) -> SystemSharedMemoryStatusResponse: "system shared memory";
            system_shared_memory_register(SystemSharedMemoryRegisterRequest) -> SystemSharedMemoryRegisterResponse: "system shared memory";
            system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest) -> SystemSharedMemoryUnregisterResponse: "system shared memory";
            cuda_shared_memory_status(CudaSharedMemoryStatusRequest) -> CudaSharedMemoryStatusResponse: "CUDA shared memory";
            cuda_shared_memory_register(CudaSharedMemoryRegisterRequest) -> CudaSharedMemoryRegisterResponse: "CUDA shared memory";
            cuda_shared_memory_unregister(CudaSharedMemoryUnregisterRequest) -> CudaSharedMemoryUnregisterResponse: "CUDA shared memory";
            trace_setting(TraceSettingRequest) -> TraceSettingResponse: "TraceSetting";
            log_settings(LogSettingsRequest) -> LogSettingsResponse: "LogSettings";
        }
    };
    ($($method:ident($req:ident) -> $resp:ident: $what:literal;)*) => {
        $(
            fn $method<'life0, 'async_trait>(
                &'life0 self,
                _request: $crate::__tonic::Request<$crate::__proto::$req>,
            ) -> ::core::pin::Pin<
                Box<
                    dyn ::core::future::Future<
                            Output = ::core::result::Result<
                                $crate::__tonic::Response<$crate::__proto::$resp>,
                                $crate::__tonic::Status,
                            >,
                        > + ::core::marker::Send
                        + 'async_trait,
                >,
            >
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async move { Err($crate::unsupported::status($what)) })
            }
        )*
    };
}

/// UNIMPLEMENTED naming what is not supported.
pub fn status(what: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!("{what} is not supported by infermesh"))
}

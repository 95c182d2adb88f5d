# Installs edkm into a scratch prefix, builds examples/train_layer against it with
# find_package(edkm), and runs it: the path a C++ user takes.
file(REMOVE_RECURSE "${WORK_DIR}")
execute_process(COMMAND ${CMAKE_COMMAND} --install "${EDKM_BINARY_DIR}" --prefix "${WORK_DIR}/prefix"
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "cmake --install failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S "${EXAMPLE_SOURCE_DIR}" -B "${WORK_DIR}/build"
                  "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix;${TORCH_PREFIX}"
                  "-DTORCH_CUDA_ARCH_LIST=${CUDA_ARCH_LIST}"
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the example failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build "${WORK_DIR}/build" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the example failed")
endif()
execute_process(COMMAND "${WORK_DIR}/build/train_layer" WORKING_DIRECTORY "${WORK_DIR}"
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "the example failed (exit ${rc})")
endif()

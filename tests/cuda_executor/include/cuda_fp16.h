#pragma once
// the executor's stand-in for the CUDA header: everything is in cuda_cpu.h
#include "../cuda_cpu.h"

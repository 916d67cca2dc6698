/*
 * CRC-32C (Castagnoli), the checksum of the chunk store's slots.
 */
#ifndef OMEGA_CRC32C_H
#define OMEGA_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Extend crc (0 to start) over n bytes of p. Uses the SSE4.2 instruction
 * where the CPU has it, a table otherwise; both give the same value. */
uint32_t crc32c(uint32_t crc, const void *p, size_t n);

#endif

/* Wine 8.0 lacks bcryptprimitives.dll, which Rust-built extensions (pydantic_core) import for
   ProcessPrng; this stand-in answers it from advapi32's RtlGenRandom, as Windows itself does. */
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length) {
    while (length) {
        ULONG chunk = length > 0x7fffffff ? 0x7fffffff : (ULONG)length;
        if (!SystemFunction036(data, chunk)) return FALSE;
        data += chunk; length -= chunk;
    }
    return TRUE;
}

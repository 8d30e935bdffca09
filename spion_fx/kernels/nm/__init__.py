"""N:M weight kernels: packed N:M storage (values + in-group indices), its CPU matmul and the
Triton packed N:M matmul."""

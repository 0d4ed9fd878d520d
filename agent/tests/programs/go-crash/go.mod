module nodewarden/tests/go-crash

go 1.19

module nodewarden/tests/go-rwmutex

go 1.19

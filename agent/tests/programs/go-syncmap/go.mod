module nodewarden/tests/go-syncmap

go 1.19

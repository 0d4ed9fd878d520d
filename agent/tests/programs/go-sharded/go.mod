module nodewarden/tests/go-sharded

go 1.19

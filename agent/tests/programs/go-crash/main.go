// nw-go-crash: unsynchronized writes to one map from 8 goroutines; the Go runtime detects them
// and dies with "fatal error: concurrent map writes" (exit status 2). It waits for a line on
// stdin first, so the test knows the agent has seen the program before it races.
package main

import (
	"bufio"
	"fmt"
	"os"
	"sync"
	"time"
)

func main() {
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		os.Exit(4)
	}
	m := make(map[string]int)
	var wg sync.WaitGroup
	go func() {
		time.Sleep(10 * time.Second)
		fmt.Fprintln(os.Stderr, "nw-go-crash: did not die within 10s")
		os.Exit(3)
	}()
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; ; i++ {
				m[fmt.Sprint("k", i%1024)] = g // racy on purpose
			}
		}(g)
	}
	wg.Wait()
}

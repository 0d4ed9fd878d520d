// syncmap: same workload as rwmutex, but with sync.Map.
package main

import (
	"flag"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

const keySpace = 1 << 16

func main() {
	n := flag.Int("goroutines", 64, "number of worker goroutines")
	dur := flag.Duration("duration", 3*time.Second, "how long to count operations")
	warmup := flag.Duration("warmup", 0, "how long to run before counting")
	flag.Parse()

	var m sync.Map
	// Every key exists before the workers start: a sync.Map's first store of a key takes its
	// mutex, and the design measured is the steady state, where stores and loads of existing
	// keys take none.
	for k := uint64(0); k < keySpace; k++ {
		m.Store(k, k)
	}
	for k := uint64(0); k < keySpace; k++ {
		m.Load(k)
	}
	var phase atomic.Int32 // 0: warming up, 1: counting, 2: stopping
	if *warmup == 0 {
		phase.Store(1)
	}
	var total atomic.Uint64
	var wg sync.WaitGroup
	for g := 0; g < *n; g++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			x := seed*0x9E3779B97F4A7C15 + 1
			var ops uint64
			for p := phase.Load(); p != 2; p = phase.Load() {
				x ^= x << 13
				x ^= x >> 7
				x ^= x << 17
				k := x % keySpace
				if x>>62 == 0 { // 25% writes
					m.Store(k, x)
				} else {
					m.Load(k)
				}
				ops += uint64(p) // counted only in phase 1
			}
			total.Add(ops)
		}(uint64(g + 1))
	}
	if *warmup > 0 {
		time.Sleep(*warmup)
		phase.Store(1)
	}
	time.Sleep(*dur)
	phase.Store(2)
	wg.Wait()
	fmt.Printf("ops=%d\n", total.Load())
}

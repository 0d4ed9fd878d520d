// sharded: same workload as rwmutex, but 64 shards, each map with its own mutex.
package main

import (
	"flag"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

const (
	keySpace = 1 << 16
	nShards  = 64
)

type shard struct {
	mu sync.Mutex
	m  map[uint64]uint64
	_  [40]byte // keep shards on separate cache lines
}

func main() {
	n := flag.Int("goroutines", 64, "number of worker goroutines")
	dur := flag.Duration("duration", 3*time.Second, "how long to count operations")
	warmup := flag.Duration("warmup", 0, "how long to run before counting")
	flag.Parse()

	var shards [nShards]shard
	for i := range shards {
		shards[i].m = make(map[uint64]uint64, keySpace/nShards)
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
				s := &shards[k%nShards]
				s.mu.Lock()
				if x>>62 == 0 { // 25% writes
					s.m[k] = x
				} else {
					_ = s.m[k]
				}
				s.mu.Unlock()
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

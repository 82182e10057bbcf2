// Command demo is the small HTTP service that config.toml.example supervises.
//
// It reads a key=value config file (reloaded on SIGHUP), says hello with the
// configured greeting, exposes Go runtime metrics for gosup's leak detection
// (/metrics, /debug/vars, /debug/pprof/), logs every request and a heartbeat,
// and shuts down gracefully on SIGTERM or SIGINT.
package main

import (
	"bufio"
	"context"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"log"
	"net/http"
	_ "net/http/pprof" // /debug/pprof/ on http.DefaultServeMux
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var requests atomic.Int64

// config is the parsed key=value file; guarded by mu because SIGHUP swaps it.
type config struct {
	mu     sync.RWMutex
	path   string
	values map[string]string
}

func (c *config) load() error {
	f, err := os.Open(c.path)
	if err != nil {
		return err
	}
	defer f.Close()
	values := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return fmt.Errorf("%s:%d: expected key=value", c.path, n)
		}
		values[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	if err := sc.Err(); err != nil {
		return err
	}
	c.mu.Lock()
	c.values = values
	c.mu.Unlock()
	log.Printf("config loaded from %s (%d keys)", c.path, len(values))
	return nil
}

func (c *config) get(key, def string) string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if v, ok := c.values[key]; ok {
		return v
	}
	return def
}

func metrics(w http.ResponseWriter, _ *http.Request) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	fmt.Fprintf(w, "# HELP go_goroutines Number of goroutines that currently exist.\n"+
		"# TYPE go_goroutines gauge\ngo_goroutines %d\n", runtime.NumGoroutine())
	fmt.Fprintf(w, "# HELP go_memstats_heap_inuse_bytes Number of heap bytes that are in use.\n"+
		"# TYPE go_memstats_heap_inuse_bytes gauge\ngo_memstats_heap_inuse_bytes %d\n", ms.HeapInuse)
	fmt.Fprintf(w, "# HELP demo_requests_total Requests served.\n"+
		"# TYPE demo_requests_total counter\ndemo_requests_total %d\n", requests.Load())
}

// logged counts and logs each request once it has been served.
func logged(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		requests.Add(1)
		next.ServeHTTP(w, r)
		log.Printf("%s %s %s %s", r.RemoteAddr, r.Method, r.URL.RequestURI(), time.Since(start).Round(time.Microsecond))
	})
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "HTTP listen address")
	cfgPath := flag.String("config", "demo.conf", "key=value config file, reloaded on SIGHUP")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	cfg := &config{path: *cfgPath}
	if err := cfg.load(); err != nil {
		log.Fatalf("config: %v", err)
	}
	expvar.Publish("goroutines", expvar.Func(func() any { return runtime.NumGoroutine() }))
	expvar.Publish("requests", expvar.Func(func() any { return requests.Load() }))

	mux := http.DefaultServeMux // expvar and pprof registered themselves here
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, cfg.get("greeting", "hello"))
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/metrics", metrics)
	srv := &http.Server{Addr: *listen, Handler: logged(mux), ReadHeaderTimeout: 10 * time.Second}

	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	log.Printf("demo listening on http://%s (pid %d)", *listen, os.Getpid())

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	heartbeat := time.NewTicker(5 * time.Second)
	defer heartbeat.Stop()
	for {
		select {
		case err := <-errc:
			log.Fatalf("http: %v", err)
		case <-heartbeat.C:
			log.Printf("heartbeat: goroutines=%d requests=%d", runtime.NumGoroutine(), requests.Load())
		case s := <-sigs:
			if s == syscall.SIGHUP {
				if err := cfg.load(); err != nil {
					log.Printf("config reload failed, keeping the previous one: %v", err)
				}
				continue
			}
			log.Printf("%v received, shutting down", s)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := srv.Shutdown(ctx)
			cancel()
			if err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Printf("shutdown: %v", err)
				os.Exit(1)
			}
			log.Print("stopped")
			return
		}
	}
}

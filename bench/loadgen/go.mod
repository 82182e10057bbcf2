module gosup.bench/loadgen

go 1.22

module gosup.example/demo

go 1.22
